"""The enrichment service: Enrichment in protos/c360/enrichment/v1/enrichment.proto."""
