//! `sqlx::migrate!` embeds the migration files when the crate compiles; this makes Cargo
//! compile it again when one is added or changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
