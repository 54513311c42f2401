//! Local files the app wrote: how they are opened and how their paths are stored.
//!
//! The rule for the capture folder: **a symbolic link is never followed**, not for a
//! photo, a sidecar or a checklist.json, in the watcher, the rescan, `enqueue`, the
//! uploader or `verify`. A capture folder is written by another user (the app); following
//! a link there would let anyone with write access make the service upload any file it can
//! read. So every read goes through [`open_regular`]: the file is opened with
//! `O_NOFOLLOW` (a link as the last component fails with `ELOOP`) and `O_NONBLOCK` (a
//! FIFO does not hang the open), then checked on the open descriptor, not before (no race
//! with a writer that swaps a file for a link): it must be a regular file, and its real
//! path (`/proc/self/fd`) must be the path asked for, which callers give as the real path
//! of the capture folder joined with the path below it ([`real_path`]), so a linked
//! directory anywhere below the capture folder is refused too. The capture folder itself
//! may be reached through a link (an operator's choice in the config).
//!
//! Paths are stored in the queue's TEXT columns by [`path_text`], reversibly: a path that
//! is valid UTF-8 is stored as it is; each byte that is not part of valid UTF-8 is stored
//! as the code point U+10FF00 + byte (private use, plane 16), and a genuine code point in
//! U+10FF80..=U+10FFFF is stored byte by byte the same way, so [`text_path`] gives back
//! exactly the bytes of the name. [`readable`] shows such a byte as `\xff`.

use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a file was not read (the detail of a `not_regular_file` reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not_regular_file: {path}: {what}; not read")]
pub struct Refused {
    /// The path as asked for, readable.
    pub path: String,
    /// `a symbolic link`, `a FIFO`, `below a symbolic link`, …
    pub what: &'static str,
}

/// The [`Refused`] inside an error of [`open_regular`], if that is why it failed.
pub fn refused(e: &io::Error) -> Option<&Refused> {
    e.get_ref().and_then(|i| i.downcast_ref::<Refused>())
}

fn refuse(path: &Path, what: &'static str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        Refused {
            path: readable_line(&path_text(path)),
            what,
        },
    )
}

/// What kind of file `meta` (from `lstat` or `fstat`) describes, when it is not a regular
/// file or a directory.
pub fn odd_kind(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() || t.is_dir() {
        None
    } else if t.is_symlink() {
        Some("a symbolic link")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_block_device() || t.is_char_device() {
        Some("a device")
    } else {
        Some("not a regular file")
    }
}

/// Opens `path` for reading under the rule above: never through a symbolic link, only a
/// regular file, and (for an absolute `path`) only if the opened file's real path is
/// `path`. A refusal is an `InvalidInput` error carrying [`Refused`].
pub fn open_regular(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refuse(path, "a symbolic link")
            } else {
                e
            }
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{}: a directory", path.display()),
            ));
        }
        return Err(refuse(
            path,
            odd_kind(&meta).unwrap_or("not a regular file"),
        ));
    }
    if path.is_absolute() {
        use std::os::fd::AsRawFd;
        // Without /proc (not on a Linux device) only the last component is checked.
        if let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) {
            if real != path {
                if real.as_os_str().as_bytes().ends_with(b" (deleted)") {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{}: deleted", path.display()),
                    ));
                }
                return Err(refuse(path, "reached through a symbolic link"));
            }
        }
    }
    Ok(f)
}

/// The path [`open_regular`] must be given for `path` (absolute, below `capture` or
/// not): the real path of `capture` joined with the rest, so no link below the capture
/// folder is followed. A path outside it (`fieldsync enqueue` of a file elsewhere) has
/// its folder resolved and its last component kept.
pub fn real_path(capture: &Path, path: &Path) -> io::Result<PathBuf> {
    let plain = |rel: &Path| {
        rel.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    };
    match path.strip_prefix(capture) {
        Ok(rel) if plain(rel) => Ok(std::fs::canonicalize(capture)?.join(rel)),
        _ => {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return Ok(path.to_path_buf());
            };
            Ok(std::fs::canonicalize(dir)?.join(name))
        }
    }
}

/// First code point of the escape range; byte `b` (>= 0x80) is `ESC + b`.
const ESC: u32 = 0x10_FF00;

fn escaped(c: char) -> Option<u8> {
    let c = c as u32;
    (ESC + 0x80..=ESC + 0xFF)
        .contains(&c)
        .then(|| (c - ESC) as u8)
}

fn push_escaped(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(char::from_u32(ESC + *b as u32).expect("a valid code point"));
    }
}

/// The stored (TEXT) form of a path: lossless, and the path itself when it is UTF-8.
pub fn path_text(p: &Path) -> String {
    let mut rest = p.as_os_str().as_bytes();
    let mut out = String::with_capacity(rest.len());
    loop {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, 0),
            Err(e) => {
                let v = e.valid_up_to();
                let s = std::str::from_utf8(&rest[..v]).expect("valid up to here");
                (s, e.error_len().unwrap_or(rest.len() - v))
            }
        };
        for c in valid.chars() {
            if escaped(c).is_some() {
                push_escaped(&mut out, c.encode_utf8(&mut [0; 4]).as_bytes());
            } else {
                out.push(c);
            }
        }
        let bad_start = valid.len();
        push_escaped(&mut out, &rest[bad_start..bad_start + bad]);
        rest = &rest[bad_start + bad..];
        if rest.is_empty() {
            return out;
        }
    }
}

/// The path a [`path_text`] stands for.
pub fn text_path(s: &str) -> PathBuf {
    if !s.chars().any(|c| escaped(c).is_some()) {
        return PathBuf::from(s);
    }
    let mut bytes = Vec::with_capacity(s.len());
    for c in s.chars() {
        match escaped(c) {
            Some(b) => bytes.push(b),
            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    PathBuf::from(OsString::from_vec(bytes))
}

/// A stored name or path for JSON (status, `list --json`, MQTT): a byte that is not
/// UTF-8 as `\xff` (JSON escapes control characters itself).
pub fn readable(s: &str) -> String {
    readable_as(s, false)
}

/// A stored name or path for one line of text (the CLI, logs, event reasons): also
/// control characters escaped (`\n`).
pub fn readable_line(s: &str) -> String {
    readable_as(s, true)
}

fn readable_as(s: &str, controls: bool) -> String {
    if !s
        .chars()
        .any(|c| escaped(c).is_some() || (controls && c.is_control()))
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if let Some(b) = escaped(c) {
            out.push_str(&format!("\\x{b:02x}"));
        } else if controls && c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(bytes: &[u8]) {
        let p = PathBuf::from(OsString::from_vec(bytes.to_vec()));
        let t = path_text(&p);
        assert_eq!(text_path(&t), p, "{bytes:?} -> {t:?}");
    }

    #[test]
    fn utf8_paths_are_stored_as_they_are() {
        for s in [
            "/c/c1/r1/IMG_1.jpg",
            "/c/Café/ü ß.jpg",
            "/c/a\nb%?#+.jpg",
            "",
        ] {
            assert_eq!(path_text(Path::new(s)), s);
            assert_eq!(text_path(s), Path::new(s));
        }
    }

    #[test]
    fn every_byte_string_round_trips() {
        round_trip(b"/c/IMG_\xff\xfe.jpg");
        round_trip(b"\x80");
        round_trip(b"a\xc3");
        round_trip(b"\xe2\x82");
        // A genuine code point of the escape range is kept apart from escaped bytes.
        round_trip("/c/\u{10FFFF}\u{10FF80}x".as_bytes());
        round_trip(b"\xf4\x8f\xbf\xbf\xff");
        for b in 0..=255u8 {
            round_trip(&[b'a', b, b'z']);
        }
        assert_ne!(
            path_text(Path::new(OsStr::from_bytes(b"\xff"))),
            path_text(Path::new("\u{FFFD}"))
        );
    }

    #[test]
    fn readable_shows_bytes_and_controls() {
        let t = path_text(Path::new(OsStr::from_bytes(b"IMG_\xff\xfe\n.jpg")));
        assert_eq!(readable_line(&t), "IMG_\\xff\\xfe\\n.jpg");
        assert_eq!(readable(&t), "IMG_\\xff\\xfe\n.jpg");
        assert_eq!(readable_line("Café.jpg"), "Café.jpg");
    }

    use std::ffi::OsStr;

    #[test]
    fn links_fifos_and_linked_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(root.join("a.jpg"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("a.jpg"), root.join("l.jpg")).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/b.jpg"), b"y").unwrap();
        std::os::unix::fs::symlink(root.join("d"), root.join("ld")).unwrap();
        assert!(std::process::Command::new("mkfifo")
            .arg(root.join("f.jpg"))
            .status()
            .unwrap()
            .success());
        assert!(open_regular(&root.join("a.jpg")).is_ok());
        assert!(open_regular(&root.join("d/b.jpg")).is_ok());
        let what = |p: &str| {
            let e = open_regular(&root.join(p)).unwrap_err();
            refused(&e).map(|r| r.what)
        };
        assert_eq!(what("l.jpg"), Some("a symbolic link"));
        assert_eq!(what("f.jpg"), Some("a FIFO"));
        assert_eq!(what("ld/b.jpg"), Some("reached through a symbolic link"));
        assert_eq!(
            open_regular(&root.join("nope.jpg")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // The capture folder itself may be a link; nothing below it may.
        std::os::unix::fs::symlink(&root, root.join("d/cap")).unwrap();
        let cap = root.join("d/cap");
        let p = real_path(&cap, &cap.join("a.jpg")).unwrap();
        assert_eq!(p, root.join("a.jpg"));
        assert!(open_regular(&p).is_ok());
        let p = real_path(&cap, &cap.join("ld/b.jpg")).unwrap();
        assert!(refused(&open_regular(&p).unwrap_err()).is_some());
    }
}
