//! The power-cut filesystem (`common/powercut.rs`) keeps exactly what was made durable, checked
//! through real syscalls on a mount: what the power-loss suite concludes rests on this model.

use crate::support::powercut::{Mounted, PowerCutFs};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A new filesystem mounted on a temp dir (the `TempDir` outlives the mount: declared first).
fn mounted() -> (tempfile::TempDir, Mounted) {
    let dir = tempfile::tempdir().unwrap();
    let mounted = PowerCutFs::mount(dir.path());
    (dir, mounted)
}

fn sync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

/// A file holding `content`, its content and its name durable.
fn durable_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut file = File::create(&path).unwrap();
    file.write_all(content).unwrap();
    file.sync_all().unwrap();
    sync_dir(dir);
    path
}

fn append(path: &Path, bytes: &[u8]) -> File {
    let mut file = OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
    file
}

#[test]
fn an_unsynced_write_is_lost() {
    let (_dir, mut fs) = mounted();
    let path = durable_file(fs.path(), "f", b"durable");
    append(&path, b" and not");
    let cut = fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"durable");
    assert_eq!(cut.dropped(), 8, "{cut}");
}

#[test]
fn a_synced_write_is_kept() {
    let (_dir, mut fs) = mounted();
    let path = durable_file(fs.path(), "f", b"durable");
    append(&path, b" too").sync_data().unwrap();
    // Writes past the end leave zeros, and the size is part of what fdatasync keeps.
    File::options().write(true).open(&path).unwrap().write_all_at(b"!", 14).unwrap();
    File::options().write(true).open(&path).unwrap().sync_data().unwrap();
    fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"durable too\0\0\0!");
}

#[test]
fn sync_file_range_makes_nothing_durable() {
    use std::os::fd::AsRawFd;
    let (_dir, mut fs) = mounted();
    let path = durable_file(fs.path(), "f", b"");
    let file = append(&path, b"flushed the sled way");
    let flags =
        libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain syscall on an open descriptor; no memory is shared with it.
    let ret = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    drop(file);
    fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"");
}

#[test]
fn a_new_file_synced_without_its_directory_is_lost() {
    let (_dir, mut fs) = mounted();
    let sub = fs.path().join("sub");
    fs::create_dir(&sub).unwrap();
    sync_dir(fs.path());
    let mut file = File::create(sub.join("f")).unwrap();
    file.write_all(b"synced").unwrap();
    file.sync_all().unwrap();
    drop(file);
    let cut = fs.power_cut(false);
    assert!(!sub.join("f").exists());
    assert!(sub.exists(), "the directory's own entry was synced");
    assert_eq!(cut.vanished, [Path::new("sub/f")], "{cut}");
}

#[test]
fn a_new_file_synced_with_its_directory_is_kept() {
    let (_dir, mut fs) = mounted();
    let sub = fs.path().join("sub");
    fs::create_dir(&sub).unwrap();
    sync_dir(fs.path());
    let path = durable_file(&sub, "f", b"synced");
    // Nor does a directory that is only created survive: its parent was not synced.
    fs::create_dir(sub.join("new")).unwrap();
    fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"synced");
    assert!(!sub.join("new").exists());
}

#[test]
fn a_rename_not_synced_is_undone() {
    let (_dir, mut fs) = mounted();
    let old = durable_file(fs.path(), "old", b"one");
    let target = durable_file(fs.path(), "target", b"two");
    fs::rename(&old, &target).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"one");
    fs.power_cut(false);
    assert_eq!(fs::read(&old).unwrap(), b"one");
    assert_eq!(fs::read(&target).unwrap(), b"two", "the file it replaced is back");
    // Synced, it stays.
    fs::rename(&old, &target).unwrap();
    sync_dir(fs.path());
    fs.power_cut(false);
    assert!(!old.exists());
    assert_eq!(fs::read(&target).unwrap(), b"one");
}

#[test]
fn an_unlink_not_synced_is_undone() {
    let (_dir, mut fs) = mounted();
    let path = durable_file(fs.path(), "f", b"durable");
    // Written without a sync before the unlink: what comes back is the durable content.
    append(&path, b" and not");
    fs::hard_link(&path, fs.path().join("link")).unwrap();
    fs::remove_file(&path).unwrap();
    let cut = fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"durable");
    assert!(!fs.path().join("link").exists(), "the link was not synced");
    assert_eq!(cut.came_back, [Path::new("f")], "{cut}");
    // Synced, it stays removed.
    fs::remove_file(&path).unwrap();
    sync_dir(fs.path());
    fs.power_cut(false);
    assert!(!path.exists());
}

#[test]
fn a_truncation_not_synced_is_undone() {
    let (_dir, mut fs) = mounted();
    let path = durable_file(fs.path(), "f", b"durable");
    File::options().write(true).open(&path).unwrap().set_len(3).unwrap();
    fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"durable");
}

#[test]
fn a_torn_cut_keeps_a_prefix_of_the_unsynced_writes() {
    let (_dir, mut fs) = mounted();
    let path = durable_file(fs.path(), "f", b"durable:");
    let mut kept_some = false;
    let mut kept_part = false;
    for _ in 0..50 {
        let before = fs::read(&path).unwrap();
        // Eight writes of distinct bytes: what is kept must be the first ones, in order.
        let writes: Vec<Vec<u8>> = (b'a'..=b'h').map(|c| vec![c; 100]).collect();
        let file = File::options().write(true).open(&path).unwrap();
        for w in &writes {
            let at = file.metadata().unwrap().len();
            file.write_all_at(w, at).unwrap();
        }
        drop(file);
        let cut = fs.power_cut(true);
        let after = fs::read(&path).unwrap();
        let expected: Vec<u8> = before.iter().copied().chain(writes.concat()).collect();
        assert!(after.len() >= before.len() && expected.starts_with(&after), "{cut}: not a prefix");
        let kept = (after.len() - before.len()) as u64;
        assert_eq!(cut.dropped(), 800 - kept, "{cut}");
        kept_some |= kept > 0;
        kept_part |= !kept.is_multiple_of(100);
        // What a cut kept is durable from then on: the next rounds append to it.
        File::open(&path).unwrap().sync_all().unwrap();
    }
    assert!(kept_some && kept_part, "50 torn cuts never kept a write, or never tore one");
}

#[test]
fn a_failed_fsync_makes_nothing_durable() {
    let (_dir, mut fs) = mounted();
    let path = durable_file(fs.path(), "f", b"durable");
    let file = append(&path, b" and not");
    fs.fail_fsyncs(libc::EIO, 2);
    assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
    // A directory's sync is not one of them.
    sync_dir(fs.path());
    assert_eq!(file.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(fs.failed_fsyncs(), 2);
    // The file is as it was: what was written is read, unsynced.
    assert_eq!(fs::read(&path).unwrap(), b"durable and not");
    drop(file);
    let cut = fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"durable");
    assert_eq!(cut.dropped(), 8, "{cut}");

    // Only `count` syncs fail, with the error asked for; the next one makes everything durable.
    let file = append(&path, b" at last");
    fs.fail_fsyncs(libc::ENOSPC, 1);
    assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    file.sync_data().unwrap();
    assert_eq!(fs.failed_fsyncs(), 3);
    drop(file);
    fs.power_cut(false);
    assert_eq!(fs::read(&path).unwrap(), b"durable at last");
}
