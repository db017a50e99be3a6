"""The `c360` command line: operations on a running mesh over gRPC."""
