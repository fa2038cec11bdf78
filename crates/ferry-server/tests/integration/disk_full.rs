//! The disk under the staging folder fills up: an upload is refused with UNAVAILABLE and a
//! message that says so (the node's agent retries), the server goes on serving, and once
//! space is free the same upload goes through.
//!
//! Mounts a 64 KiB tmpfs over the staging folder, so it needs root (or `sudo -n`), as
//! `.ci/run` has.

use crate::support;

use std::{path::Path, process::Command};

use ferry_proto::v1::HeartbeatRequest;
use support::*;
use tonic::Code;

/// A tmpfs mounted over a folder until dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        let mount = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let target = at.to_str().expect("utf-8");
        let args = ["-t", "tmpfs", "-o", "size=64k", "tmpfs", target];
        let sudo_args = [&["-n", "mount"][..], &args[..]].concat();
        assert!(
            mount("mount", &args) || mount("sudo", &sudo_args),
            "this test mounts a small tmpfs and needs root or passwordless sudo"
        );
        Self(at.to_path_buf())
    }

    /// Fills the disk with one file; returns it.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = [0u8; 4096];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let target = self.0.to_str().expect("utf-8");
        let unmounted = Command::new("umount")
            .arg(target)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("sudo").args(["-n", "umount", target]).status();
        }
    }
}

#[tokio::test]
async fn a_full_disk_refuses_uploads_clearly_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = add_token(dir.path(), "site-a").await;
    let running = start(dir.path(), 1, 1).await;
    let disk = SmallDisk::mount(&dir.path().join("uploads"));
    let mut c = client(&running.url).await;
    let node = enrol(&mut c, &token).await;
    let task = pull(&mut c, &node).await;
    let bytes = update_bytes(vec![0.5; 6], 10);

    let filler = disk.fill();
    let err = upload(&mut c, &node, chunks(task.round, &bytes, 0, 100))
        .await
        .expect_err("no space");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("disk is full"), "{}", err.message());

    // Still serving.
    let beat = c
        .heartbeat(authed(&node, HeartbeatRequest { round: task.round }))
        .await
        .expect("heartbeats still answered")
        .into_inner();
    assert!(beat.keep_working);

    // Space again: the upload resumes and is accepted.
    std::fs::remove_file(filler).expect("free space");
    let status = c
        .upload_status(authed(
            &node,
            ferry_proto::v1::UploadStatusRequest {
                round: task.round,
                hash: ferry_core::content::content_id(&bytes),
            },
        ))
        .await
        .expect("status")
        .into_inner();
    let from = status.received_bytes as usize;
    let receipt = upload(&mut c, &node, chunks(task.round, &bytes, from, 100))
        .await
        .expect("accepted once there is space");
    assert!(receipt.accepted);
    let rounds = wait_rounds(&running.coordinator, 1).await;
    assert_eq!(rounds[0].participants, 1);
    running.stop().await;
    drop(disk);
}
