//! The two databases the store runs on, each fresh for one test: a SQLite file in a temporary
//! folder, and a PostgreSQL database of its own, created on the server that
//! `scripts/start-postgres.sh` starts (or `FERRY_TEST_POSTGRES_URL`) and dropped afterwards.
//! A missing PostgreSQL fails the test: it is part of the suite, not an option.

use ferry_harness::postgres::Database;

/// A store URL for one test, removed with it.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(Database),
}

impl Backend {
    pub fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    /// A new, empty PostgreSQL database.
    pub async fn postgres() -> Self {
        Self::Postgres(Database::create().await)
    }

    /// The URL `Store::open` takes.
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(dir) => format!("sqlite:{}", dir.path().join("db/ferry.db").display()),
            Self::Postgres(database) => database.url(),
        }
    }
}

/// One `#[tokio::test]` per backend for each named suite function, which takes the backend.
macro_rules! on_both_backends {
    ($($suite:ident),* $(,)?) => {
        $(
            mod $suite {
                use crate::store::backends::Backend;

                #[tokio::test]
                async fn sqlite() {
                    super::$suite(Backend::sqlite()).await;
                }

                #[tokio::test]
                async fn postgres() {
                    super::$suite(Backend::postgres().await).await;
                }
            }
        )*
    };
}
pub(crate) use on_both_backends;
