"""pgrecovery: declarative, observable, resumable PostgreSQL disaster recovery for BOSH clusters."""

__version__ = "0.1.0"
