"""The profile service: Profile in protos/c360/profile/v1/profile.proto."""
