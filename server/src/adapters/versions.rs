//! The live versions of each adapter name, cached from the database, so that resolving a
//! request's adapter reference does not query the database each time and keeps working
//! from memory while the database cannot be reached.
//!
//! - A name's versions are read once and kept until something changes them: this process's
//!   own import or delete (it invalidates at once), or another process's on a shared
//!   database (its announcement `adapters:<tenant>:<name>` arrives by notification).
//! - Announcements are not stored: after the listening connection was lost, and every poll
//!   period in any case, every entry becomes stale. A stale entry is read again on its next
//!   use; when the database cannot be reached then, the stale entry answers (and the
//!   failure is logged), so adapters in use keep serving. For a few seconds after such a
//!   failure stale entries answer without trying the database again, so requests do not
//!   each wait out a connection timeout.
//! - A read that raced an invalidation is not cached (a generation count tells).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::store::{AdapterRow, Db, DbError};

/// The announcement prefix of an adapter name's change.
const PREFIX: &str = "adapters:";

/// What another process announces after changing `tenant`'s adapter `name`.
pub fn announcement(tenant: &str, name: &str) -> String {
    format!("{PREFIX}{tenant}:{name}")
}

struct Entry {
    /// Live versions, ascending.
    rows: Vec<AdapterRow>,
    epoch: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<(String, String), Entry>,
    /// Bumped by every invalidation: a read that started before one is not cached.
    generation: u64,
    /// Bumped when every entry becomes stale.
    epoch: u64,
    /// Until when stale entries answer without a try of the database (it just failed).
    unreachable_until: Option<Instant>,
}

/// How long after the database could not be reached stale entries answer at once.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Versions {
    state: Mutex<State>,
}

impl Versions {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live row of `version` (the newest when `None`) of `tenant`'s `name`, or `None`.
    pub async fn find(
        &self,
        db: &Db,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<AdapterRow>, DbError> {
        let key = (tenant.to_string(), name.to_string());
        let pick = |rows: &[AdapterRow]| match version {
            None => rows.last().cloned(),
            Some(v) => rows.iter().find(|r| r.version == v).cloned(),
        };
        let (generation, stale) = {
            let s = self.lock();
            let unreachable = s.unreachable_until.is_some_and(|t| Instant::now() < t);
            match s.entries.get(&key) {
                Some(e) if e.epoch == s.epoch || unreachable => return Ok(pick(&e.rows)),
                Some(e) => (s.generation, Some(pick(&e.rows))),
                None => (s.generation, None),
            }
        };
        let rows = match db.adapter_versions(tenant, name).await {
            Ok(rows) => rows,
            Err(e) if e.is_unavailable() => {
                self.lock().unreachable_until = Some(Instant::now() + UNREACHABLE_GRACE);
                let Some(stale) = stale else { return Err(e) };
                tracing::warn!(error = %e, "the database cannot be reached: resolving an adapter from memory");
                return Ok(stale);
            }
            Err(e) => return Err(e),
        };
        let found = pick(&rows);
        let mut s = self.lock();
        s.unreachable_until = None;
        if s.generation == generation {
            let epoch = s.epoch;
            s.entries.insert(key, Entry { rows, epoch });
        }
        Ok(found)
    }

    /// Forgets `tenant`'s `name` (after this process changed it, or another announced it).
    pub fn invalidate(&self, tenant: &str, name: &str) {
        let mut s = self.lock();
        s.generation += 1;
        s.entries.remove(&(tenant.to_string(), name.to_string()));
    }

    /// Handles an announcement; false when it is not about adapters.
    pub fn announced(&self, what: &str) -> bool {
        let Some(rest) = what.strip_prefix(PREFIX) else {
            return false;
        };
        match rest.split_once(':') {
            Some((tenant, name)) => self.invalidate(tenant, name),
            None => self.all_stale(),
        }
        true
    }

    /// Every entry is read again on its next use (kept meanwhile for when the database
    /// cannot be reached).
    pub fn all_stale(&self) {
        let mut s = self.lock();
        s.generation += 1;
        s.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, TestPostgres};

    /// With PostgreSQL stopped: a stale name answers from memory, a name never read answers
    /// the database's error, and for a while after the failure a stale name answers at once
    /// (it does not wait out another connection timeout).
    #[tokio::test]
    async fn stale_names_answer_from_memory_while_the_database_is_unreachable() {
        let pg = TestPostgres::start();
        let db = Db::connect(&pg.database("versions").await)
            .await
            .expect("connect");
        db.insert_adapter(&testing::new_adapter("t", "a"))
            .await
            .expect("insert");
        let v = Versions::default();
        let version = |r: Option<AdapterRow>| r.map(|r| r.version);
        assert_eq!(
            version(v.find(&db, "t", "a", None).await.expect("read")),
            Some(1)
        );
        v.all_stale();
        pg.stop();
        assert_eq!(
            version(v.find(&db, "t", "a", None).await.expect("from memory")),
            Some(1)
        );
        let e = v
            .find(&db, "t", "never-read", None)
            .await
            .expect_err("nothing in memory");
        assert!(e.is_unavailable(), "{e:?}");
        let started = Instant::now();
        assert_eq!(
            version(v.find(&db, "t", "a", Some(1)).await.expect("at once")),
            Some(1)
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "waited {:?}",
            started.elapsed()
        );
    }
}
