//! Links the compression libraries Debian's static RocksDB (librocksdb.a) calls into.
//! Not bundled into this crate's rlib: at the final link they come after every rlib,
//! so after the RocksDB objects that need them (see .cargo/config.toml).

fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    if std::env::var_os("ROCKSDB_STATIC").is_none() {
        return;
    }
    let dir =
        std::env::var("ROCKSDB_LIB_DIR").unwrap_or_else(|_| "/usr/lib/x86_64-linux-gnu".into());
    println!("cargo:rustc-link-search=native={dir}");
    for lib in ["snappy", "lz4", "zstd", "bz2", "z"] {
        if !std::path::Path::new(&dir)
            .join(format!("lib{lib}.a"))
            .exists()
        {
            panic!(
                "{dir}/lib{lib}.a is missing: RocksDB is linked statically and needs it. \
                 Run `cargo xtask setup` (it installs librocksdb-dev and its -dev dependencies)"
            );
        }
        println!("cargo:rustc-link-lib=static:-bundle={lib}");
    }
}
