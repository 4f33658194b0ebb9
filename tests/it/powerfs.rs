//! A filesystem that loses what was not synced, for power-cut tests (as Jepsen's
//! LazyFS does): a FUSE filesystem (the `fuser` crate) held in this process's memory.
//!
//! Every file has two contents: what programs read and wrote (`current`), and what
//! reached the "disk" (`durable`). A write changes `current` and is remembered as
//! pending; `fsync` or `fdatasync` of the file (through any descriptor) applies its
//! pending writes, in order, to `durable`. `sync_file_range` never reaches a FUSE
//! filesystem, so it makes nothing durable here, which is what a power cut does to
//! data it only started writing back. [`PowerFs::power_cut`] throws every pending
//! write away: each file becomes what its last sync left. Metadata (files and
//! directories created, renamed, removed) is applied at once, as LazyFS does by
//! default: this models lost data, not a lost directory entry.
//!
//! Files are opened with direct I/O, so the kernel's page cache never serves bytes
//! that a power cut took back. Mounting needs `/dev/fuse` and root; without them
//! [`PowerFs::mount`] says why and the test skips.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Attributes are never cached by the kernel: a power cut changes sizes.
const TTL: Duration = Duration::ZERO;

#[derive(Debug)]
enum Node {
    Dir(BTreeMap<OsString, u64>),
    File {
        current: Vec<u8>,
        durable: Vec<u8>,
        /// Writes since the last sync, in order: `(offset, bytes)`, or a new length.
        pending: Vec<Pending>,
    },
    /// A socket (the node's admin socket) or anything else without contents.
    Special(FileType),
}

#[derive(Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    Length(u64),
}

#[derive(Debug)]
struct Inode {
    node: Node,
    perm: u16,
    nlink: u32,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next: u64,
    /// Bytes written and not yet synced, for reports.
    unsynced_bytes: u64,
}

/// What a power cut threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cut {
    pub files: usize,
    pub bytes: u64,
}

impl State {
    fn new() -> State {
        let mut inodes = HashMap::new();
        inodes.insert(
            1,
            Inode {
                node: Node::Dir(BTreeMap::new()),
                perm: 0o755,
                nlink: 2,
            },
        );
        State {
            inodes,
            next: 2,
            unsynced_bytes: 0,
        }
    }

    fn attr(&self, ino: u64, req: Option<&Request>) -> Option<FileAttr> {
        let inode = self.inodes.get(&ino)?;
        let (kind, size) = match &inode.node {
            Node::Dir(_) => (FileType::Directory, 4096),
            Node::File { current, .. } => (FileType::RegularFile, current.len() as u64),
            Node::Special(kind) => (*kind, 0),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: inode.perm,
            nlink: inode.nlink,
            uid: req.map_or(0, Request::uid),
            gid: req.map_or(0, Request::gid),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::Dir(entries)) => Ok(entries),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node, perm: u16) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let nlink = if matches!(node, Node::Dir(_)) { 2 } else { 1 };
        self.inodes.insert(ino, Inode { node, perm, nlink });
        self.dir(parent)?.insert(name.to_os_string(), ino);
        Ok(ino)
    }

    fn new_file() -> Node {
        Node::File {
            current: Vec::new(),
            durable: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        match (&self.inodes.get(&ino).ok_or(Errno::ENOENT)?.node, want_dir) {
            (Node::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Node::Dir(_), false) => return Err(Errno::EISDIR),
            (Node::File { .. } | Node::Special(_), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.dir(parent)?.remove(name);
        // Open descriptors may still use it; nothing reads it by name any more.
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.nlink = 0;
        }
        Ok(())
    }

    fn file(&mut self, ino: u64) -> Result<(&mut Vec<u8>, &mut Vec<Pending>), Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::File {
                current, pending, ..
            }) => Ok((current, pending)),
            Some(Node::Dir(_)) => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let (current, pending) = self.file(ino)?;
        let end = offset as usize + data.len();
        if current.len() < end {
            current.resize(end, 0);
        }
        current[offset as usize..end].copy_from_slice(data);
        pending.push(Pending::Write(offset, data.to_vec()));
        self.unsynced_bytes += data.len() as u64;
        Ok(())
    }

    fn set_len(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let (current, pending) = self.file(ino)?;
        current.resize(len as usize, 0);
        pending.push(Pending::Length(len));
        Ok(())
    }

    fn sync(&mut self, ino: u64) {
        if let Some(Inode {
            node: Node::File {
                durable, pending, ..
            },
            ..
        }) = self.inodes.get_mut(&ino)
        {
            for op in pending.drain(..) {
                match op {
                    Pending::Write(offset, data) => {
                        let end = offset as usize + data.len();
                        if durable.len() < end {
                            durable.resize(end, 0);
                        }
                        durable[offset as usize..end].copy_from_slice(&data);
                        self.unsynced_bytes = self.unsynced_bytes.saturating_sub(data.len() as u64);
                    }
                    Pending::Length(len) => durable.resize(len as usize, 0),
                }
            }
        }
    }

    fn power_cut(&mut self) -> Cut {
        let mut cut = Cut::default();
        for inode in self.inodes.values_mut() {
            if let Node::File {
                current,
                durable,
                pending,
            } = &mut inode.node
                && !pending.is_empty()
            {
                cut.files += 1;
                cut.bytes += pending
                    .iter()
                    .map(|p| match p {
                        Pending::Write(_, d) => d.len() as u64,
                        Pending::Length(_) => 0,
                    })
                    .sum::<u64>();
                pending.clear();
                current.clone_from(durable);
            }
        }
        self.unsynced_bytes = 0;
        // Files nobody can reach any more are gone with the power.
        self.inodes.retain(|ino, i| *ino == 1 || i.nlink > 0);
        cut
    }
}

/// The filesystem as `fuser` drives it.
struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl fuser::Filesystem for Fs {
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        match s.dir(parent.0).map(|d| d.get(name).copied()) {
            Ok(Some(ino)) => match s.attr(ino, Some(req)) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0, Some(req)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        if let Some(len) = size
            && let Err(e) = s.set_len(ino.0, len)
        {
            return reply.error(e);
        }
        if let (Some(mode), Some(inode)) = (mode, s.inodes.get_mut(&ino.0)) {
            inode.perm = (mode & 0o7777) as u16;
        }
        match s.attr(ino.0, Some(req)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // S_IFMT bits: S_IFSOCK, S_IFIFO, else a regular file.
        let kind = match mode & 0o170000 {
            0o140000 => Node::Special(FileType::Socket),
            0o010000 => Node::Special(FileType::NamedPipe),
            _ => State::new_file(),
        };
        let mut s = self.state();
        match s.add(parent.0, name, kind, ((mode & !umask) & 0o7777) as u16) {
            Ok(ino) => match s.attr(ino, Some(req)) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        let perm = ((mode & !umask) & 0o7777) as u16;
        match s.add(parent.0, name, Node::Dir(BTreeMap::new()), perm) {
            Ok(ino) => match s.attr(ino, Some(req)) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.state().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let result = (|| {
            let ino = *s.dir(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            let replaced = s.dir(newparent.0)?.get(newname).copied();
            if replaced.is_some() && flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if !flags.difference(RenameFlags::RENAME_NOREPLACE).is_empty() {
                return Err(Errno::EINVAL);
            }
            s.dir(parent.0)?.remove(name);
            s.dir(newparent.0)?.insert(newname.to_os_string(), ino);
            if let Some(old) = replaced.filter(|o| *o != ino)
                && let Some(inode) = s.inodes.get_mut(&old)
            {
                inode.nlink = 0;
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.state();
        if !s.inodes.contains_key(&ino.0) {
            return reply.error(Errno::ENOENT);
        }
        if flags.0 & 0o1000 != 0
            && let Err(e) = s.set_len(ino.0, 0)
        {
            return reply.error(e);
        }
        reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let perm = ((mode & !umask) & 0o7777) as u16;
        match s.add(parent.0, name, State::new_file(), perm) {
            Ok(ino) => match s.attr(ino, Some(req)) {
                Some(a) => reply.created(
                    &TTL,
                    &a,
                    Generation(0),
                    FileHandle(ino),
                    FopenFlags::FOPEN_DIRECT_IO,
                ),
                None => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.state();
        match s.file(ino.0) {
            Ok((current, _)) => {
                let start = (offset as usize).min(current.len());
                let end = (start + size as usize).min(current.len());
                reply.data(&current[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.state().sync(ino.0);
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let grow = match s.file(ino.0) {
            Ok((current, _)) => mode == 0 && (current.len() as u64) < offset + length,
            Err(e) => return reply.error(e),
        };
        if grow && let Err(e) = s.set_len(ino.0, offset + length) {
            return reply.error(e);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.state();
        let entries: Vec<(u64, OsString)> = match s.dir(ino.0) {
            Ok(d) => d.iter().map(|(n, i)| (*i, n.clone())).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![(ino.0, OsString::from(".")), (1, OsString::from(".."))];
        all.extend(entries);
        for (i, (child, name)) in all.into_iter().enumerate().skip(offset as usize) {
            let kind = match s.inodes.get(&child).map(|n| &n.node) {
                Some(Node::Dir(_)) => FileType::Directory,
                Some(Node::Special(k)) => *k,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 16 GiB, nearly all free: the node's free-space guard must not refuse.
        let blocks = 4 * 1024 * 1024;
        reply.statfs(
            blocks,
            blocks - 1024,
            blocks - 1024,
            1 << 20,
            1 << 20,
            4096,
            255,
            4096,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// A mounted [`PowerFs`]: unmounted when dropped.
pub struct PowerFs {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    dir: tempfile::TempDir,
}

impl PowerFs {
    /// Mounts a fresh, empty filesystem on a temp dir; `Err(why)` where FUSE cannot be
    /// mounted here.
    pub fn mount() -> Result<PowerFs, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("no /dev/fuse".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let state = Arc::new(Mutex::new(State::new()));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("switchboard-powerfs".into()),
            fuser::MountOption::RW,
        ];
        let session = fuser::spawn_mount(Fs(state.clone()), dir.path(), &config)
            .map_err(|e| format!("cannot mount FUSE on {}: {e}", dir.path().display()))?;
        Ok(PowerFs {
            state,
            session: Some(session),
            dir,
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Cuts the power: everything written and not synced is gone.
    pub fn power_cut(&self) -> Cut {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .power_cut()
    }

    /// Bytes written and not synced now.
    pub fn unsynced_bytes(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unsynced_bytes
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

#[test]
fn what_is_not_synced_is_lost_and_what_is_stays() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let fs = match PowerFs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let path = fs.path().join("log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_data().unwrap();
    f.write_all(b" and lost").unwrap();
    std::fs::create_dir(fs.path().join("sub")).unwrap();
    // A second descriptor's fsync syncs the file, as on a real filesystem.
    let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut text = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(text, "synced and lost");
    assert!(fs.unsynced_bytes() > 0);
    let cut = fs.power_cut();
    assert_eq!(cut.files, 1);
    assert_eq!(std::fs::read(&path).unwrap(), b"synced");
    f.write_all(b"!").unwrap();
    other.sync_all().unwrap();
    fs.power_cut();
    // The descriptor wrote on at its offset (15), past the end the cut left: a hole.
    let mut expected = b"synced".to_vec();
    expected.extend([0; 9]);
    expected.push(b'!');
    assert_eq!(std::fs::read(&path).unwrap(), expected);
    assert!(fs.path().join("sub").is_dir(), "metadata is kept");
}
