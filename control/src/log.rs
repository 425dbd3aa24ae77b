//! The Raft log in RocksDB: entries keyed by big-endian index in one column family,
//! the vote, the committed id and the purge point in another. Every append and every
//! vote is a synced write: a reply leaves this node only after its log is on disk.

use crate::types::*;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, StorageIOError};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const LOGS: &str = "logs";
const META: &str = "meta";

#[derive(Debug, thiserror::Error)]
#[error(
    "Raft log {path} cannot be opened ({reason}). If its files are damaged, this node's \
     log is lost. In a cluster: on a healthy node run `boxd cluster remove <this node's \
     id>`, move this data directory aside, and join again with a new token (`boxd cluster \
     token`): the other nodes hold every committed entry. A single-node cluster has no \
     other copy: restore the data directory from a backup"
)]
pub struct LogOpenError {
    pub path: PathBuf,
    pub reason: String,
}

/// The RocksDB-backed log store (cheap to clone: readers share the database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl LogStore {
    pub fn open(path: &Path) -> Result<Self, LogOpenError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        // A damaged write-ahead log is an error, never a silently shortened log: entries
        // this node acknowledged may be what a quorum counted on.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::AbsoluteConsistency);
        let cfs = [LOGS, META].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| LogOpenError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let store = Self { db: Arc::new(db) };
        // Read everything once: a damaged block fails here, at start, not mid-election.
        let verify = || -> Result<(), String> {
            for item in store.db.iterator_cf(store.cf(LOGS), IteratorMode::Start) {
                let (_, v) = item.map_err(|e| e.to_string())?;
                serde_json::from_slice::<Entry>(&v)
                    .map_err(|e| format!("undecodable entry: {e}"))?;
            }
            for item in store.db.iterator_cf(store.cf(META), IteratorMode::Start) {
                item.map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        verify().map_err(|reason| LogOpenError {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, k: &str) -> Result<Option<T>, StorageError> {
        let v = self
            .db
            .get_cf(self.cf(META), k)
            .map_err(|e| StorageIOError::read(&io_err(e)))?;
        match v {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StorageIOError::read(&io_err(e)).into()),
        }
    }

    fn put_meta(&self, k: &str, v: &impl serde::Serialize) -> Result<(), std::io::Error> {
        let b = serde_json::to_vec(v).map_err(io_err)?;
        self.db
            .put_cf_opt(self.cf(META), k, b, &Self::synced())
            .map_err(io_err)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        match self.db.iterator_cf(self.cf(LOGS), IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
                let e: Entry = serde_json::from_slice(&v)
                    .map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
                Ok(Some(e.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(LOGS),
            IteratorMode::From(&key(start), Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StorageIOError::read_logs(&io_err("bad key")))?,
            );
            if !range.contains(&idx) {
                break;
            }
            out.push(
                serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(&io_err(e)))?,
            );
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta("last_purged")?;
        let last = self.last_entry_id()?.max(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta("vote", vote)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only means re-discovering the commit point.
        let b = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&io_err(e)))?;
        self.db
            .put_cf(self.cf(META), "committed", b)
            .map_err(|e| StorageIOError::write(&io_err(e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>("committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
            batch.put_cf(self.cf(LOGS), key(e.log_id.index), v);
        }
        let res = self.db.write_opt(batch, &Self::synced()).map_err(io_err);
        let failed = res
            .as_ref()
            .err()
            .map(|e| StorageIOError::write_logs(&io_err(e)));
        callback.log_io_completed(res);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db
            .delete_range_cf_opt(
                self.cf(LOGS),
                key(log_id.index),
                key(u64::MAX),
                &Self::synced(),
            )
            .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The purge point and the deletion in one synced batch: after a crash the log
        // state never claims entries that are gone, nor keeps a hole it doesn't know of.
        let mut batch = WriteBatch::default();
        let marker = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write(&io_err(e)))?;
        batch.put_cf(self.cf(META), "last_purged", marker);
        batch.delete_range_cf(self.cf(LOGS), key(0), key(log_id.index + 1));
        self.db
            .write_opt(batch, &Self::synced())
            .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }
}
