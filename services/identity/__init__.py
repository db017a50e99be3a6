"""The identity service: Identity in protos/c360/identity/v1/identity.proto."""
