//! A disk that loses power: an in-memory FUSE filesystem, served by the test process itself, on
//! which a write survives a power cut only once it was made durable in the strict POSIX sense.
//!
//! - A file's content (its bytes and its size) is durable as of its last `fsync` or `fdatasync`.
//! - A directory's entries are durable as of its own last `fsync`: a file created (or linked,
//!   renamed, unlinked) since is lost (or back under its old name, or back with its durable
//!   content) at a cut, even if the file's content was synced.
//! - Nothing else makes anything durable. `sync_file_range(2)`, all that sled 0.34's `flush`
//!   issues, never reaches a FUSE filesystem: it only writes back the kernel's page cache, and
//!   files here are opened with direct I/O, so nothing waits there. That is the point of the model.
//!
//! [`Mounted::power_cut`] unmounts (so no kernel cache survives), rolls every file and directory
//! back to its durable state, drops what is no longer reachable and mounts the same state again.
//! A *torn* cut also keeps, of each file's unsynced writes, a random prefix in the order they were
//! made, the last one cut at a random byte: a write torn by the power loss.
//!
//! [`Mounted::fail_fsyncs`] makes the next file syncs fail with an error of the test's choosing
//! (EIO, ENOSPC): a failed sync makes nothing durable, and leaves the file as it was (what was
//! written since the last sync stays readable, unsynced, until a later sync or a cut).
//!
//! Replies carry a TTL of 0 and every open is direct I/O, so each lookup, read and write reaches
//! the model as the program made it (a write of more than 128 KiB arrives as several). File locks
//! (`flock`, `fcntl`) are not implemented, so the kernel keeps them locally, as it does for any
//! FUSE filesystem that leaves them out. Only regular files and directories exist: symlinks,
//! special files and extended attributes are refused; `rename` takes no flags and does not refuse
//! to move a directory into itself; `fallocate` is refused and `copy_file_range` left to the
//! kernel's read-and-write fallback; a shared writable `mmap` is refused (direct I/O). Neither the
//! broker nor sled 0.34 uses any of these.

use super::WAIT;
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use libc::{c_int, EEXIST, EINVAL, EISDIR, ENOENT, ENOTDIR, ENOTEMPTY, EPERM};
use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// The kernel caches no entry and no attribute: every lookup asks the model.
const TTL: Duration = Duration::ZERO;
/// What `statfs` reports free: the broker refuses to write to a disk that looks full.
const FREE_BYTES: u64 = 64 << 30;
const BLOCK: u32 = 4096;
/// How long an unmount may wait for files still open before it detaches the mount lazily.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

/// A change to a file's content that is not durable yet.
enum Change {
    Write { offset: usize, data: Vec<u8> },
    Resize(usize),
}

impl Change {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match self {
            Change::Write { offset, data } => {
                let end = offset + data.len();
                // A write past the end leaves zeros in between, as a hole reads.
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[*offset..end].copy_from_slice(data);
            }
            Change::Resize(len) => bytes.resize(*len, 0),
        }
    }

    /// Bytes written (a resize writes none).
    fn len(&self) -> u64 {
        match self {
            Change::Write { data, .. } => data.len() as u64,
            Change::Resize(_) => 0,
        }
    }
}

/// A file's bytes, as read and as they would be after a cut.
#[derive(Default)]
struct Content {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// The changes since the last sync, in order: `durable` with all of them applied is `current`
    /// (kept rather than copying `current` at each sync, which would copy a whole file per fsync).
    unsynced: Vec<Change>,
}

impl Content {
    fn change(&mut self, change: Change) {
        change.apply(&mut self.current);
        self.unsynced.push(change);
    }

    fn sync(&mut self) {
        for change in self.unsynced.drain(..) {
            change.apply(&mut self.durable);
        }
    }

    /// Rolls back to the durable bytes, or, torn, to them with a prefix of the unsynced changes,
    /// the last one cut short. Returns the unsynced bytes written and those kept.
    fn cut(&mut self, torn: bool, rng: &mut impl Rng) -> (u64, u64) {
        let written = self.unsynced.iter().map(Change::len).sum();
        let keep = if torn { rng.random_range(0..=self.unsynced.len()) } else { 0 };
        let mut kept = 0;
        for (i, change) in self.unsynced.drain(..).take(keep).enumerate() {
            let change = match change {
                Change::Write { offset, mut data } if i + 1 == keep => {
                    data.truncate(rng.random_range(0..=data.len()));
                    Change::Write { offset, data }
                }
                change => change,
            };
            kept += change.len();
            change.apply(&mut self.durable);
        }
        self.current = self.durable.clone();
        (written, kept)
    }
}

/// A directory's entries, as listed and as they would be after a cut.
#[derive(Default)]
struct Entries {
    current: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

enum Node {
    File(Content),
    Dir(Entries),
}

struct Inode {
    node: Node,
    perm: u16,
    /// Current entries naming a file (a directory reports 2).
    nlink: u32,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Inode {
    fn new(node: Node, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode { node, perm, nlink: 1, uid, gid, atime: now, mtime: now, ctime: now }
    }

    fn kind(&self) -> FileType {
        match self.node {
            Node::File(_) => FileType::RegularFile,
            Node::Dir(_) => FileType::Directory,
        }
    }
}

/// The whole filesystem. Inodes are never dropped while it is mounted (an unlinked file may still
/// be open, or come back at a cut); a cut drops those it leaves unreachable.
struct Disk {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
}

type Result<T> = std::result::Result<T, c_int>;

impl Disk {
    fn new(uid: u32, gid: u32) -> Disk {
        let root = Inode::new(Node::Dir(Entries::default()), 0o755, uid, gid);
        Disk { inodes: HashMap::from([(fuser::FUSE_ROOT_ID, root)]), next_ino: fuser::FUSE_ROOT_ID + 1 }
    }

    fn inode(&mut self, ino: u64) -> Result<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(ENOENT)
    }

    fn content(&mut self, ino: u64) -> Result<&mut Content> {
        match &mut self.inode(ino)?.node {
            Node::File(content) => Ok(content),
            Node::Dir(_) => Err(EISDIR),
        }
    }

    fn entries(&mut self, ino: u64) -> Result<&mut Entries> {
        match &mut self.inode(ino)?.node {
            Node::Dir(entries) => Ok(entries),
            Node::File(_) => Err(ENOTDIR),
        }
    }

    fn child(&mut self, parent: u64, name: &OsStr) -> Result<u64> {
        self.entries(parent)?.current.get(name).copied().ok_or(ENOENT)
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.inodes.get(&ino).is_some_and(|i| matches!(i.node, Node::Dir(_)))
    }

    fn attr(&self, ino: u64) -> Result<FileAttr> {
        let inode = self.inodes.get(&ino).ok_or(ENOENT)?;
        let (size, nlink) = match &inode.node {
            Node::File(content) => (content.current.len() as u64, inode.nlink),
            Node::Dir(_) => (u64::from(BLOCK), 2),
        };
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            crtime: inode.ctime,
            kind: inode.kind(),
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    /// Marks a directory (or file) changed now.
    fn touch(&mut self, ino: u64) {
        if let Ok(inode) = self.inode(ino) {
            let now = SystemTime::now();
            inode.mtime = now;
            inode.ctime = now;
        }
    }

    /// A new inode named `name` in `parent` (a current entry only, until `parent` is synced).
    fn add(&mut self, parent: u64, name: &OsStr, inode: Inode) -> Result<FileAttr> {
        if self.entries(parent)?.current.contains_key(name) {
            return Err(EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, inode);
        self.entries(parent)?.current.insert(name.to_owned(), ino);
        self.touch(parent);
        self.attr(ino)
    }

    /// One entry naming `ino` is gone.
    fn unlinked(&mut self, ino: u64) {
        if let Ok(inode) = self.inode(ino) {
            inode.nlink = inode.nlink.saturating_sub(1);
            inode.ctime = SystemTime::now();
        }
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        let ino = self.child(parent, name)?;
        match (dir, self.is_dir(ino)) {
            (false, true) => return Err(EISDIR),
            (true, false) => return Err(ENOTDIR),
            (true, true) if !self.entries(ino)?.current.is_empty() => return Err(ENOTEMPTY),
            _ => {}
        }
        self.entries(parent)?.current.remove(name);
        self.unlinked(ino);
        self.touch(parent);
        Ok(())
    }

    fn rename(&mut self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr) -> Result<()> {
        let ino = self.child(parent, name)?;
        self.entries(new_parent)?;
        if let Ok(target) = self.child(new_parent, new_name) {
            if target == ino {
                // Two names of one file: POSIX says rename does nothing.
                return Ok(());
            }
            match (self.is_dir(ino), self.is_dir(target)) {
                (true, false) => return Err(ENOTDIR),
                (false, true) => return Err(EISDIR),
                (true, true) if !self.entries(target)?.current.is_empty() => return Err(ENOTEMPTY),
                _ => {}
            }
            self.unlinked(target);
        }
        self.entries(parent)?.current.remove(name);
        self.entries(new_parent)?.current.insert(new_name.to_owned(), ino);
        self.touch(parent);
        self.touch(new_parent);
        Ok(())
    }

    fn link(&mut self, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<FileAttr> {
        if self.is_dir(ino) {
            return Err(EPERM);
        }
        self.inode(ino)?;
        let entries = self.entries(new_parent)?;
        if entries.current.contains_key(new_name) {
            return Err(EEXIST);
        }
        entries.current.insert(new_name.to_owned(), ino);
        let inode = self.inode(ino)?;
        inode.nlink += 1;
        inode.ctime = SystemTime::now();
        self.touch(new_parent);
        self.attr(ino)
    }

    /// Every path reachable through current entries, relative to the root, with its inode.
    fn paths(&self) -> BTreeMap<PathBuf, u64> {
        let mut paths = BTreeMap::new();
        let mut todo = vec![(PathBuf::new(), fuser::FUSE_ROOT_ID)];
        // A cut can leave a directory named twice (a rename whose two directories were not both
        // synced): visit each directory once.
        let mut seen = HashSet::new();
        while let Some((path, ino)) = todo.pop() {
            let Some(Inode { node: Node::Dir(entries), .. }) = self.inodes.get(&ino) else { continue };
            if !seen.insert(ino) {
                continue;
            }
            for (name, &child) in &entries.current {
                let child_path = path.join(name);
                paths.insert(child_path.clone(), child);
                todo.push((child_path, child));
            }
        }
        paths
    }

    fn power_cut(&mut self, torn: bool) -> CutReport {
        let before = self.paths();
        let mut rng = rand::rng();
        let mut losses = Vec::new();
        for (&ino, inode) in &mut self.inodes {
            match &mut inode.node {
                Node::File(content) if !content.unsynced.is_empty() => {
                    let (written, kept) = content.cut(torn, &mut rng);
                    losses.push((ino, written, kept));
                }
                Node::File(_) => {}
                Node::Dir(entries) => entries.current = entries.durable.clone(),
            }
        }
        let after = self.paths();
        let mut links: HashMap<u64, u32> = HashMap::from([(fuser::FUSE_ROOT_ID, 1)]);
        for ino in after.values() {
            *links.entry(*ino).or_default() += 1;
        }
        self.inodes.retain(|ino, _| links.contains_key(ino));
        for (ino, inode) in &mut self.inodes {
            inode.nlink = links[ino];
        }
        let name = |ino: u64| {
            [&before, &after]
                .into_iter()
                .find_map(|paths| paths.iter().find(|(_, i)| **i == ino))
                .map_or(format!("(unlinked inode {ino})"), |(path, _)| path.display().to_string())
        };
        let mut files: Vec<Loss> =
            losses.into_iter().map(|(ino, written, kept)| Loss { path: name(ino), written, kept }).collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        CutReport {
            torn,
            files,
            vanished: before.keys().filter(|p| !after.contains_key(*p)).cloned().collect(),
            came_back: after.keys().filter(|p| !before.contains_key(*p)).cloned().collect(),
        }
    }
}

/// What a file lost at a cut.
#[derive(Debug, Clone)]
pub struct Loss {
    /// Its path under the mount point.
    pub path: String,
    /// Bytes written since its last sync.
    pub written: u64,
    /// Of those, bytes a torn cut kept.
    pub kept: u64,
}

/// What a power cut did, for a test's log.
#[derive(Debug, Clone)]
pub struct CutReport {
    pub torn: bool,
    /// Every file that had unsynced changes.
    pub files: Vec<Loss>,
    /// Paths gone (created, or renamed here, since their directory's last sync).
    pub vanished: Vec<PathBuf>,
    /// Paths back (removed, or renamed away, since their directory's last sync).
    pub came_back: Vec<PathBuf>,
}

impl CutReport {
    /// Unsynced bytes the cut dropped.
    pub fn dropped(&self) -> u64 {
        self.files.iter().map(|f| f.written - f.kept).sum()
    }
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// At most this many paths of a list are named.
        const NAMED: usize = 8;
        fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
            let named: Vec<String> = items.iter().take(NAMED).map(|i| i.to_string()).collect();
            write!(f, "[{}", named.join(", "))?;
            if items.len() > NAMED {
                write!(f, ", and {} more", items.len() - NAMED)?;
            }
            write!(f, "]")
        }
        write!(
            f,
            "{} cut: dropped {} unsynced bytes in {} files ",
            if self.torn { "torn" } else { "clean" },
            self.dropped(),
            self.files.len()
        )?;
        let files: Vec<String> = self
            .files
            .iter()
            .map(|l| match l.kept {
                0 => format!("{} -{}", l.path, l.written),
                kept => format!("{} -{} (kept {kept})", l.path, l.written - kept),
            })
            .collect();
        list(f, &files)?;
        if !self.vanished.is_empty() {
            write!(f, "; vanished ")?;
            list(f, &self.vanished.iter().map(|p| p.display()).collect::<Vec<_>>())?;
        }
        if !self.came_back.is_empty() {
            write!(f, "; came back ")?;
            list(f, &self.came_back.iter().map(|p| p.display()).collect::<Vec<_>>())?;
        }
        Ok(())
    }
}

/// Syncs of files made to fail (see [`Mounted::fail_fsyncs`]).
#[derive(Default)]
struct Faults {
    /// The error they fail with.
    errno: c_int,
    /// How many more file syncs fail.
    left: usize,
    /// File syncs failed so far.
    failed: usize,
}

/// The FUSE side: every request locks the disk, applies itself, answers.
pub struct PowerCutFs {
    disk: Arc<Mutex<Disk>>,
    faults: Arc<Mutex<Faults>>,
}

/// Opens are direct I/O: no page cache, so every write reaches the model when it is made, and
/// `sync_file_range` has nothing to write back.
const OPEN_FLAGS: u32 = fuser::consts::FOPEN_DIRECT_IO;

impl PowerCutFs {
    /// Mounts a new, empty filesystem on `mountpoint` (an existing directory), served by a thread
    /// of this process until the returned handle is dropped. Needs root and `/dev/fuse`.
    pub fn mount(mountpoint: &Path) -> Mounted {
        let owner = std::fs::metadata(mountpoint).expect("the mount point exists");
        let disk = Arc::new(Mutex::new(Disk::new(owner.uid(), owner.gid())));
        let mut mounted =
            Mounted { path: mountpoint.to_path_buf(), disk, faults: Arc::default(), session: None };
        mounted.mount();
        mounted
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error this file sync is to fail with, if it is one of those [`Mounted::fail_fsyncs`]
    /// asked for.
    fn fault(&self) -> Option<c_int> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        if faults.left == 0 {
            return None;
        }
        faults.left -= 1;
        faults.failed += 1;
        Some(faults.errno)
    }
}

fn entry(reply: ReplyEntry, attr: Result<FileAttr>) {
    match attr {
        Ok(attr) => reply.entry(&TTL, &attr, 0),
        Err(err) => reply.error(err),
    }
}

fn empty(reply: ReplyEmpty, result: Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(err),
    }
}

/// The permission bits a create asks for.
fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

fn set_time(time: Option<TimeOrNow>) -> Option<SystemTime> {
    time.map(|t| match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    })
}

impl Filesystem for PowerCutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut disk = self.disk();
        let attr = disk.child(parent, name).and_then(|ino| disk.attr(ino));
        entry(reply, attr);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.disk().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(err) => reply.error(err),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut disk = self.disk();
        let result = (|| {
            if let Some(size) = size {
                disk.content(ino)?.change(Change::Resize(size as usize));
                disk.touch(ino);
            }
            let inode = disk.inode(ino)?;
            if let Some(mode) = mode {
                inode.perm = (mode & 0o7777) as u16;
            }
            inode.uid = uid.unwrap_or(inode.uid);
            inode.gid = gid.unwrap_or(inode.gid);
            inode.atime = set_time(atime).unwrap_or(inode.atime);
            inode.mtime = set_time(mtime).unwrap_or(inode.mtime);
            inode.ctime = SystemTime::now();
            disk.attr(ino)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(err) => reply.error(err),
        }
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(EPERM);
        }
        let file = Inode::new(Node::File(Content::default()), perm(mode, umask), req.uid(), req.gid());
        entry(reply, self.disk().add(parent, name, file));
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let dir = Inode::new(Node::Dir(Entries::default()), perm(mode, umask), req.uid(), req.gid());
        entry(reply, self.disk().add(parent, name, dir));
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.disk().remove(parent, name, false));
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.disk().remove(parent, name, true));
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        // RENAME_NOREPLACE, RENAME_EXCHANGE and RENAME_WHITEOUT are not modelled.
        if flags != 0 {
            return reply.error(EINVAL);
        }
        empty(reply, self.disk().rename(parent, name, new_parent, new_name));
    }

    fn link(&mut self, _req: &Request<'_>, ino: u64, new_parent: u64, new_name: &OsStr, reply: ReplyEntry) {
        entry(reply, self.disk().link(ino, new_parent, new_name));
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.disk().content(ino) {
            Ok(_) => reply.opened(0, OPEN_FLAGS),
            Err(err) => reply.error(err),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let mut disk = self.disk();
        match disk.content(ino) {
            Ok(content) => {
                let bytes = &content.current;
                let from = (offset as usize).min(bytes.len());
                let to = (from + size as usize).min(bytes.len());
                reply.data(&bytes[from..to]);
            }
            Err(err) => reply.error(err),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut disk = self.disk();
        match disk.content(ino) {
            Ok(content) => {
                content.change(Change::Write { offset: offset as usize, data: data.to_vec() });
                disk.touch(ino);
                reply.written(data.len() as u32);
            }
            Err(err) => reply.error(err),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        // Closing makes nothing durable.
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        if let Some(errno) = self.fault() {
            // Nothing is made durable.
            return reply.error(errno);
        }
        // fdatasync too: the size is part of what the model keeps, and it needs it.
        empty(reply, self.disk().content(ino).map(Content::sync));
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let mut disk = self.disk();
        let names: Vec<(OsString, u64)> = match disk.entries(ino) {
            Ok(entries) => entries.current.iter().map(|(n, i)| (n.clone(), *i)).collect(),
            Err(err) => return reply.error(err),
        };
        let dots = [(OsString::from("."), ino), (OsString::from(".."), ino)];
        let listed = dots.into_iter().chain(names).enumerate().skip(offset as usize);
        for (i, (name, child)) in listed {
            let kind = if disk.is_dir(child) { FileType::Directory } else { FileType::RegularFile };
            // The offset of an entry is where the next listing resumes.
            if reply.add(child, i as i64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let result = self.disk().entries(ino).map(|entries| entries.durable = entries.current.clone());
        empty(reply, result);
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks = FREE_BYTES / u64::from(BLOCK);
        reply.statfs(blocks, blocks, blocks, 1 << 20, 1 << 20, BLOCK, 255, BLOCK);
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let file = Inode::new(Node::File(Content::default()), perm(mode, umask), req.uid(), req.gid());
        match self.disk().add(parent, name, file) {
            Ok(attr) => reply.created(&TTL, &attr, 0, 0, OPEN_FLAGS),
            Err(err) => reply.error(err),
        }
    }
}

/// A mounted [`PowerCutFs`]; unmounted on drop.
pub struct Mounted {
    path: PathBuf,
    disk: Arc<Mutex<Disk>>,
    /// Kept across cuts, like the disk.
    faults: Arc<Mutex<Faults>>,
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cuts the power: unmounts, rolls everything back to what was durable (with `torn`, each
    /// file keeps a random prefix of its unsynced writes, the last one torn), and mounts the same
    /// disk again, with nothing cached in the kernel. Every process using the mount must have
    /// exited first.
    pub fn power_cut(&mut self, torn: bool) -> CutReport {
        self.unmount();
        let report = self.disk.lock().unwrap_or_else(|e| e.into_inner()).power_cut(torn);
        self.mount();
        report
    }

    /// Makes the next `count` syncs of files (`fsync`, `fdatasync`, by any process) fail with
    /// `errno`, such as `libc::EIO` or `libc::ENOSPC`, instead of any earlier such request. A
    /// failed sync makes nothing durable and changes nothing else. Directories' syncs are not
    /// affected.
    pub fn fail_fsyncs(&self, errno: c_int, count: usize) {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        (faults.errno, faults.left) = (errno, count);
    }

    /// How many syncs of files [`Mounted::fail_fsyncs`] made fail so far.
    pub fn failed_fsyncs(&self) -> usize {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).failed
    }

    fn mount(&mut self) {
        let fs = PowerCutFs { disk: self.disk.clone(), faults: self.faults.clone() };
        let options = [MountOption::FSName("powercut".into()), MountOption::RW];
        let session = fuser::spawn_mount2(fs, &self.path, &options)
            .expect("mount the power-cut filesystem (needs root and /dev/fuse)");
        self.session = Some(session);
        // The first request waits for the session's handshake: the mount is served from here on.
        let root = std::fs::metadata(&self.path).expect("stat the new mount");
        assert_eq!(root.ino(), fuser::FUSE_ROOT_ID, "{} is the power-cut filesystem", self.path.display());
    }

    /// Unmounts and waits for the session to end, lazily detaching the mount if a file on it is
    /// still open after a while.
    fn unmount(&mut self) {
        let Some(session) = self.session.take() else { return };
        let (ended, ending) = mpsc::channel();
        // `join` unmounts, then waits for the session thread, which ends once the kernel closes
        // the connection: a file still open would keep both waiting.
        std::thread::spawn(move || {
            session.join();
            let _ = ended.send(());
        });
        let mut result = ending.recv_timeout(UNMOUNT_WAIT);
        if result == Err(mpsc::RecvTimeoutError::Timeout) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
            result = ending.recv_timeout(WAIT);
        }
        if let Err(err) = result {
            let problem = format!("the FUSE session on {} did not end cleanly: {err:?}", self.path.display());
            // Panicking again in a drop during a panic would abort the whole test binary.
            if std::thread::panicking() {
                eprintln!("{problem}");
            } else {
                panic!("{problem}");
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.unmount();
    }
}
