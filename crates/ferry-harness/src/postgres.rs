//! A PostgreSQL database for one test, created on the tests' server and dropped afterwards.

use sqlx::{AnyConnection, Connection};

/// Where `scripts/start-postgres.sh` puts the tests' server and role.
pub const DEFAULT_URL: &str = "postgres://ferry:ferry@127.0.0.1:5432/ferry_test";

/// The server tests use: `FERRY_TEST_POSTGRES_URL`, else [`DEFAULT_URL`].
pub fn server_url() -> String {
    std::env::var("FERRY_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into())
}

/// A new, empty database, dropped when this is.
#[derive(Debug)]
pub struct Database {
    admin: String,
    name: String,
}

impl Database {
    /// Creates the database; panics, saying what to run, when the server is not reachable.
    pub async fn create() -> Self {
        let admin = server_url();
        sqlx::any::install_default_drivers();
        let mut connection = AnyConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {admin} is not reachable ({e}): these tests need it; run \
                 scripts/start-postgres.sh (scripts/install-deps.sh installs it), or set \
                 FERRY_TEST_POSTGRES_URL"
            )
        });
        let name = format!("ferry_t_{:016x}", rand::random::<u64>());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .expect("the test role may create databases");
        Self { admin, name }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        let base = self
            .admin
            .rsplit_once('/')
            .map_or(self.admin.as_str(), |(base, _)| base);
        format!("{base}/{}", self.name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop may run inside a test's runtime, which cannot be blocked on: a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(sqlx::Error::Io)?;
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
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}
