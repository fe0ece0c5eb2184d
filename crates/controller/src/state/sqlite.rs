//! The daemon's state in SQLite: each rollout's document and persisted machine status, and its
//! complete event history. Written in one transaction per machine step, before the step's actions
//! are carried out, so a `kill -9` at any moment restarts from a state no older than what the
//! routers were told.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use coalmine_rollout::{Event, Status};
use coalmine_spec::group::RolloutGroup;
use coalmine_spec::rollout::Rollout;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state file: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state file holds a record Coalmine cannot read: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// The file exists but is not (or no longer) a Coalmine state file: starting on it would
    /// forget every rollout it held, and with them canaries carrying traffic.
    #[error("{path}: {why}")]
    NotOurs { path: String, why: String },
}

/// `PRAGMA application_id` of a Coalmine state file ("Coal").
const APPLICATION_ID: i32 = 0x436f_616c;

/// How a state file was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Created,
    Existing,
}

/// A stored rollout Coalmine could not read back: named, so the others can go on.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub name: String,
    pub error: String,
}

/// One rollout as stored.
#[derive(Debug, Clone)]
pub struct StoredRollout {
    pub rollout: Rollout,
    pub status: Status,
    /// Bumped by every `apply` that starts a new run; events carry it.
    pub run: i64,
    /// The routers took the final routes (meaningful once the rollout has ended).
    pub settled: bool,
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens the state file, creating it if it does not exist. An existing file must be a
    /// Coalmine state file: an empty one (truncated, or made by hand) or another program's
    /// database is refused rather than silently treated as "no rollouts".
    pub fn open(path: &Path) -> Result<(Store, Opened), StoreError> {
        let not_ours = |why: String| StoreError::NotOurs {
            path: path.display().to_string(),
            why,
        };
        let opened = match std::fs::metadata(path) {
            Ok(m) if m.len() == 0 => {
                return Err(not_ours(
                    "the state file is empty (0 bytes), so it holds no Coalmine state: if it was truncated, restore it from a backup; if it was created for Coalmine, delete it and Coalmine will create it".into(),
                ))
            }
            Ok(_) => Opened::Existing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Opened::Created,
            Err(e) => return Err(not_ours(format!("cannot read the state file: {e}"))),
        };
        let db = Connection::open(path)?;
        if opened == Opened::Existing {
            let id: i32 = db
                .pragma_query_value(None, "application_id", |r| r.get(0))
                .map_err(|e| not_ours(format!("not a Coalmine state file ({e})")))?;
            let ours: bool = db.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'rollouts'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n == 1),
            )?;
            // Files from before the id was set have the tables and id 0.
            if id != APPLICATION_ID && !(id == 0 && ours) {
                return Err(not_ours(
                    "not a Coalmine state file (another program's database?)".into(),
                ));
            }
        }
        // WAL + synchronous=FULL: a committed step survives kill -9 and power loss.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.pragma_update(None, "application_id", APPLICATION_ID)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS rollouts (
                name TEXT PRIMARY KEY,
                spec TEXT NOT NULL,
                status TEXT NOT NULL,
                run INTEGER NOT NULL,
                settled INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                rollout TEXT NOT NULL,
                run INTEGER NOT NULL,
                event TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_by_rollout ON events (rollout, id);
            CREATE TABLE IF NOT EXISTS groups (
                name TEXT PRIMARY KEY,
                spec TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS meta (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL
            );",
        )?;
        // Made once per state file: the daemon driving it names itself to routers by it, the
        // same after a restart or a move of the file.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seed = format!("{} {}", now.as_nanos(), std::process::id());
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('controller', ?1)",
            params![format!(
                "{:016x}",
                xxhash_rust::xxh3::xxh3_64(seed.as_bytes())
            )],
        )?;
        Ok((
            Store {
                db: Arc::new(Mutex::new(db)),
            },
            opened,
        ))
    }

    /// This state file's controller id (made when the file was created).
    pub fn controller_id(&self) -> Result<String, StoreError> {
        Ok(self
            .db()
            .query_row("SELECT value FROM meta WHERE key = 'controller'", [], |r| {
                r.get(0)
            })?)
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores a new run of a rollout (replacing an earlier one of the same name) with its first
    /// events. Returns the run number.
    pub fn start_run(
        &self,
        rollout: &Rollout,
        status: &Status,
        events: &[Event],
    ) -> Result<i64, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let run: i64 = tx
            .query_row(
                "SELECT run FROM rollouts WHERE name = ?1",
                params![rollout.metadata.name],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0)
            + 1;
        tx.execute(
            "INSERT INTO rollouts (name, spec, status, run, settled) VALUES (?1, ?2, ?3, ?4, 0)
             ON CONFLICT(name) DO UPDATE SET spec = ?2, status = ?3, run = ?4, settled = 0",
            params![
                rollout.metadata.name,
                serde_json::to_string(rollout)?,
                serde_json::to_string(status)?,
                run
            ],
        )?;
        insert_events(&tx, &rollout.metadata.name, run, events)?;
        tx.commit()?;
        Ok(run)
    }

    /// Records one machine step: the new status and the events it produced, atomically.
    pub fn record(
        &self,
        name: &str,
        run: i64,
        status: &Status,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        // A step of a run that a newer apply replaced is dropped, not written over it.
        let changed = tx.execute(
            "UPDATE rollouts SET status = ?1 WHERE name = ?2 AND run = ?3",
            params![serde_json::to_string(status)?, name, run],
        )?;
        if changed == 1 {
            insert_events(&tx, name, run, events)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn mark_settled(&self, name: &str, run: i64) -> Result<(), StoreError> {
        self.db().execute(
            "UPDATE rollouts SET settled = 1 WHERE name = ?1 AND run = ?2",
            params![name, run],
        )?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Option<StoredRollout>, StoreError> {
        let db = self.db();
        let row = db
            .query_row(
                "SELECT spec, status, run, settled FROM rollouts WHERE name = ?1",
                params![name],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get(2)?,
                        r.get(3)?,
                    ))
                },
            )
            .optional()?;
        row.map(decode).transpose()
    }

    /// Every stored rollout, each read on its own: one that cannot be read is named, and the
    /// others are not held back by it.
    pub fn all(&self) -> Result<Vec<Result<StoredRollout, Unreadable>>, StoreError> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT name, spec, status, run, settled FROM rollouts ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            let name: String = r.get(0)?;
            let row = (|| {
                Ok::<_, rusqlite::Error>((
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            })();
            Ok((name, row))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, row) = row?;
            out.push(
                row.map_err(StoreError::from)
                    .and_then(decode)
                    .map_err(|e| Unreadable {
                        name,
                        error: e.to_string(),
                    }),
            );
        }
        Ok(out)
    }

    /// Forgets a rollout: its document, state and history.
    pub fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let n = tx.execute("DELETE FROM rollouts WHERE name = ?1", params![name])?;
        tx.execute("DELETE FROM events WHERE rollout = ?1", params![name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Stores a rollout group (replacing one of the same name).
    pub fn save_group(&self, group: &RolloutGroup) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO groups (name, spec) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET spec = ?2",
            params![group.metadata.name, serde_json::to_string(group)?],
        )?;
        Ok(())
    }

    /// Every stored group, by name.
    pub fn groups(&self) -> Result<Vec<RolloutGroup>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT spec FROM groups ORDER BY name")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }

    /// Forgets a group (its members stay).
    pub fn delete_group(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .db()
            .execute("DELETE FROM groups WHERE name = ?1", params![name])?;
        Ok(n > 0)
    }

    /// Every event of every run of `name`, oldest first, with its run number.
    pub fn history(&self, name: &str) -> Result<Vec<(i64, Event)>, StoreError> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT run, event FROM events WHERE rollout = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![name], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (run, text) = row?;
            out.push((run, serde_json::from_str(&text)?));
        }
        Ok(out)
    }
}

fn insert_events(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    run: i64,
    events: &[Event],
) -> Result<(), StoreError> {
    let mut stmt =
        tx.prepare_cached("INSERT INTO events (rollout, run, event) VALUES (?1, ?2, ?3)")?;
    for event in events {
        stmt.execute(params![name, run, serde_json::to_string(event)?])?;
    }
    Ok(())
}

fn decode(row: (String, String, i64, bool)) -> Result<StoredRollout, StoreError> {
    Ok(StoredRollout {
        rollout: serde_json::from_str(&row.0)?,
        status: serde_json::from_str(&row.1)?,
        run: row.2,
        settled: row.3,
    })
}
