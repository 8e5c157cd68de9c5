//! Migration bookkeeping shared by the backends: embedded migrations, checksums, and the check
//! that an applied migration was never edited (migrations are append-only).

use super::Backend;
use crate::Error;

/// A migration: a version, a name, and its SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// FNV-1a, stable across Rust versions, to notice an applied migration that was edited.
    pub fn checksum(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// Checks applied migrations against the embedded ones; returns those still to apply.
pub(crate) fn pending(
    all: &'static [Migration],
    applied: &[(i64, String)],
) -> Result<Vec<&'static Migration>, Error> {
    let mut todo = Vec::new();
    for migration in all {
        match applied.iter().find(|(v, _)| *v == migration.version) {
            Some((_, checksum)) if *checksum != migration.checksum() => {
                return Err(Error::Migration(format!(
                    "migration {} ({}) was changed after it was applied",
                    migration.version, migration.description
                )));
            }
            Some(_) => {}
            None => todo.push(migration),
        }
    }
    if let Some((version, _)) = applied
        .iter()
        .find(|(v, _)| !all.iter().any(|m| m.version == *v))
    {
        return Err(Error::Migration(format!(
            "the database has migration {version}, which this version of journaled does not know: is a newer version deployed?"
        )));
    }
    Ok(todo)
}

/// Runs journaled's migrations on `pool`. Tracked in journaled's own table, so the
/// application's own migrator never sees them; safe to run concurrently and repeatedly.
pub async fn migrate<DB: Backend>(pool: &sqlx::Pool<DB>) -> Result<(), Error> {
    DB::migrate(pool).await
}
