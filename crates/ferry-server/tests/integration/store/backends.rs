//! The two databases the store runs on, each fresh for one test: a SQLite file in a temporary
//! folder, and a PostgreSQL database of its own, created on the server that
//! `scripts/start-postgres.sh` starts (or `FERRY_TEST_POSTGRES_URL`) and dropped afterwards.
//! A missing PostgreSQL fails the test: it is part of the suite, not an option.

use sqlx::{AnyConnection, Connection};

/// Where `scripts/start-postgres.sh` puts the tests' database.
const DEFAULT_POSTGRES: &str = "postgres://ferry:ferry@127.0.0.1:5432/ferry_test";

/// A store URL for one test, removed with it.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres { admin: String, name: String },
}

impl Backend {
    pub fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    /// A new, empty PostgreSQL database.
    pub async fn postgres() -> Self {
        let admin =
            std::env::var("FERRY_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES.into());
        sqlx::any::install_default_drivers();
        let mut connection = AnyConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {admin} is not reachable ({e}): the store's tests need it; \
                 run scripts/start-postgres.sh (scripts/install-deps.sh installs it), or set \
                 FERRY_TEST_POSTGRES_URL"
            )
        });
        let name = format!("ferry_t_{:016x}", rand::random::<u64>());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .expect("the test role may create databases");
        Self::Postgres { admin, name }
    }

    /// The URL `Store::open` takes.
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(dir) => format!("sqlite:{}", dir.path().join("db/ferry.db").display()),
            Self::Postgres { admin, name } => {
                let base = admin
                    .rsplit_once('/')
                    .map_or(admin.as_str(), |(base, _)| base);
                format!("{base}/{name}")
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let Self::Postgres { admin, name } = self else {
            return;
        };
        let (admin, name) = (admin.clone(), name.clone());
        let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut connection = AnyConnection::connect(&admin).await?;
                sqlx::query(&statement)
                    .execute(&mut connection)
                    .await
                    .map(drop)
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {name}: {dropped:?}");
        }
    }
}

/// One `#[tokio::test]` per backend for each named suite function, which takes the backend.
macro_rules! on_both_backends {
    ($($suite:ident),* $(,)?) => {
        $(
            mod $suite {
                use super::backends::Backend;

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
