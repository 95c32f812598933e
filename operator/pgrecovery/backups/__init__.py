"""backups layer (see DESIGN.md): find, fetch and decrypt a9s-pg logical backups.

Pure logic and byte streams; storage is reached only through `adapters.objectstore.ObjectStore`.

    config     S3Location, AzureLocation, S3Credentials, AzureCredentials, EncryptionKey, Digest
    naming     backup ids and object keys (parsed from the right), natural part order
    listing    list_backups → BackupListing, select_backup → Backup (latest unless an id is given)
    download   download_backup: parallel ranged reads, per-part resume, retries → DownloadResult
    sources    LocalPartsSource (downloaded files), StorePartsSource (straight from the store)
    pipeline   check_key (fail fast on a wrong key), decrypt_stream → AsyncIterator[bytes]
    decrypt    OpenSSL `enc` format: EVP_BytesToKey (MD5/SHA-256), AES-256-CBC, PKCS#7
    gunzip     isal (zlib fallback) streaming gunzip, multi-member, CRC32/ISIZE verified
    sink       write_stream_to_file / write_stream_to_fileobj → size + sha256
    stores     open_store(location, credential values): one registry entry per backend
    localstore LocalDirStore: a directory seen as an ObjectStore
    progress   Progress, ProgressCallback, human_size
"""
