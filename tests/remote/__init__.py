"""Object storage (pipeline/data/remote): against a real S3 server (moto) behind a fault proxy."""
