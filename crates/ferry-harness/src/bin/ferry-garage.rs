//! `ferry-garage`: a Garage S3 server on loopback for trying Ferry's S3 blob store by hand and
//! for measurements (`ferry bench round --blobs s3://...`). Prints the variables that reach it
//! and a bucket URL, then serves until interrupted (Ctrl-C or SIGTERM); its data goes with it.
//!
//! ```sh
//! target/release/ferry-garage > /tmp/garage.env &   # then: . /tmp/garage.env
//! ```

use std::io::Write as _;

use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let garage = ferry_harness::garage::Garage::start();
    let mut out = std::io::stdout();
    for (name, value) in garage.env() {
        writeln!(out, "export {name}={value}")?;
    }
    writeln!(out, "# blobs = \"{}\"", garage.url("ferry"))?;
    out.flush()?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    drop(garage);
    Ok(())
}
