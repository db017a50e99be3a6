"""The gdpr service: Gdpr in protos/c360/gdpr/v1/gdpr.proto."""
