"""The gate service: Gate in protos/c360/gate/v1/gate.proto."""
