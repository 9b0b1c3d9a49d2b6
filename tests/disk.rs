//! Disk full and the disk budget: publishing gets RESOURCE_EXHAUSTED naming the limit, nothing
//! acknowledged is harmed, subscribers keep being served, and publishing works again once there
//! is room. On a real small filesystem (a tmpfs, when the test may mount one) and with the
//! configured `max_disk_bytes`.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;
use tapeline::config::Config;
use tapeline::grpc::pb;
use tonic::Code;

/// Publishes 64 KiB batches into `stream` until one is refused; returns the acknowledged
/// payloads and the refusal.
async fn fill_until_refused(url: &str, stream: &str) -> (Vec<String>, tonic::Status) {
    let mut client = client(url).await;
    let mut acked = Vec::new();
    for i in 0.. {
        let payloads: Vec<String> = (0..16).map(|j| format!("{i}:{j}:{}", "d".repeat(4000))).collect();
        let records = payloads.iter().map(|p| record(stream, p.as_str())).collect();
        match client.publish(pb::PublishRequest { records, ..Default::default() }).await {
            Ok(_) => acked.extend(payloads),
            Err(status) => return (acked, status),
        }
        assert!(i < 100_000, "never refused");
    }
    unreachable!()
}

/// Everything in `stream`, read from the beginning to the tail.
async fn everything(url: &str, stream: &str) -> Vec<String> {
    let mut client = client(url).await;
    let tail = client.hello(pb::HelloRequest::default()).await.unwrap().into_inner().tail_tick;
    let mut sub =
        Sub::open(&mut client, pb::SubscribeRequest { end: Some(tail), ..request(&[stream], beginning()) })
            .await;
    payloads(&sub.until_end().await)
}

/// Publishes one small record, retrying while the budget is still exhausted (it is read again
/// at most every 500 ms).
async fn publishes_again(url: &str) -> u64 {
    let mut client = client(url).await;
    for _ in 0..50 {
        match client
            .publish(pb::PublishRequest { records: vec![record("after", "ok")], ..Default::default() })
            .await
        {
            Ok(ack) => return ack.into_inner().ticks[0],
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("publishing did not resume");
}

#[tokio::test]
async fn the_configured_limit_refuses_publishing_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 24u64 << 20;
    let server = TestServer::start_with(Config { max_disk_bytes: Some(limit), ..config(dir.path()) }).await;
    // A subscriber following live while the disk fills.
    let mut follower = client(&server.url()).await;
    let mut live = Sub::open(&mut follower, request(&["big"], beginning())).await;
    let (acked, refusal) = fill_until_refused(&server.url(), "big").await;
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains(&format!("at most {limit} bytes (max_disk_bytes)")), "{refusal:?}");
    assert!(!acked.is_empty());
    assert_eq!(payloads(&live.take_records(acked.len()).await), acked, "subscribers keep being served");
    assert_eq!(everything(&server.url(), "big").await, acked, "nothing acknowledged is harmed");
    server.stop().await;

    // Room again (here: a higher limit): publishing works, and everything is still there.
    let server =
        TestServer::start_with(Config { max_disk_bytes: Some(limit * 4), ..config(dir.path()) }).await;
    publishes_again(&server.url()).await;
    assert_eq!(everything(&server.url(), "big").await, acked);
    server.stop().await;
}

/// Mounts a tmpfs of `mib` MiB at `at`, or says why it cannot.
fn mount_tmpfs(at: &Path, mib: u64) -> Result<(), String> {
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs", at.to_str().unwrap()])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

#[tokio::test]
async fn a_full_filesystem_refuses_publishing_until_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small-disk");
    std::fs::create_dir(&mount).unwrap();
    if let Err(why) = mount_tmpfs(&mount, 96) {
        // Without the right to mount, the configured-limit test above covers the budget.
        eprintln!("SKIPPED: cannot mount a tmpfs here ({why})");
        return;
    }
    let _unmount = Unmount(&mount);
    let data = mount.join("data");
    let reserve = 16u64 << 20;
    let server = TestServer::start_with(Config { min_free_disk_bytes: reserve, ..config(&data) }).await;
    // Another tenant fills most of the disk.
    let ballast = mount.join("ballast");
    let free = fs4::available_space(&mount).unwrap();
    std::fs::write(&ballast, vec![0u8; (free - reserve - (24 << 20)) as usize]).unwrap();

    let mut follower = client(&server.url()).await;
    let mut live = Sub::open(&mut follower, request(&["big"], beginning())).await;
    let (acked, refusal) = fill_until_refused(&server.url(), "big").await;
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("bytes must stay free on the disk (min_free_disk_bytes)"),
        "{refusal:?}"
    );
    eprintln!("refused after {} records: {}", acked.len(), refusal.message());
    assert_eq!(payloads(&live.take_records(acked.len()).await), acked, "subscribers keep being served");
    assert_eq!(everything(&server.url(), "big").await, acked, "nothing acknowledged is harmed");

    // Space freed: publishing resumes on the same running broker, and nothing was lost.
    std::fs::remove_file(&ballast).unwrap();
    let tick = publishes_again(&server.url()).await;
    assert!(tick > 0);
    assert_eq!(everything(&server.url(), "big").await, acked);
    server.stop().await;
    // And after a restart on the formerly full disk.
    let server = TestServer::start(&data).await;
    assert_eq!(everything(&server.url(), "big").await, acked);
    server.stop().await;
}
