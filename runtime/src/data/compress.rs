//! Compressed input: gzip (`.gz`) and Zstandard (`.zst`), recognised by their magic bytes and
//! checked against the file name's extension. Both decoders are pure Rust (flate2's miniz_oxide
//! backend, ruzstd).

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Error, Result};

/// gzip's first two bytes (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// A Zstandard frame's magic number, little-endian (RFC 8878).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// How a file's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain bytes.
    None,
    /// gzip (one or more members).
    Gzip,
    /// Zstandard (one or more frames).
    Zstd,
}

impl Compression {
    /// The compression a file name's extension announces (`.gz`, `.zst`), `None` otherwise.
    pub fn from_extension(path: &Path) -> Compression {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("gz") => Compression::Gzip,
            Some(e) if e.eq_ignore_ascii_case("zst") => Compression::Zstd,
            _ => Compression::None,
        }
    }

    /// The compression the first bytes of a file show.
    pub fn from_magic(head: &[u8]) -> Compression {
        if head.starts_with(&GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(&ZSTD_MAGIC) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The format's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "plain",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Opens `path` for reading, decompressing gzip or Zstandard content. The content decides; a
/// `.gz` / `.zst` name whose content is not of that kind is an [`Error::Decompress`] (a file
/// renamed by mistake, or a truncated download).
pub fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < head.len() {
        let got = file.read(&mut head[n..]).map_err(|e| Error::io(path, e))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let by_content = Compression::from_magic(&head[..n]);
    let by_name = Compression::from_extension(path);
    if by_name != Compression::None && by_content != by_name {
        return Err(Error::Decompress {
            path: path.to_path_buf(),
            format: by_name.name(),
            message: format!(
                "the name says {} but the content does not start with its magic bytes ({} bytes read: {:02x?})",
                by_name.name(),
                n,
                &head[..n]
            ),
        });
    }
    Ok(match by_content {
        Compression::None => Box::new(BufReader::new(file)),
        Compression::Gzip => Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            BufReader::new(file),
        ))),
        Compression::Zstd => Box::new(Cursor::new(decode_zstd(path, file)?)),
    })
}

/// Decodes every Zstandard frame of `file` (skippable frames are not accepted).
fn decode_zstd(path: &Path, mut file: File) -> Result<Vec<u8>> {
    let mut compressed = Vec::new();
    file.read_to_end(&mut compressed)
        .map_err(|e| Error::io(path, e))?;
    let bad = |message: String| Error::Decompress {
        path: path.to_path_buf(),
        format: Compression::Zstd.name(),
        message,
    };
    let mut input: &[u8] = &compressed;
    let mut out = Vec::new();
    while !input.is_empty() {
        let offset = compressed.len() - input.len();
        let mut frame = ruzstd::decoding::StreamingDecoder::new(&mut input)
            .map_err(|e| bad(format!("frame at byte {offset}: {e}")))?;
        frame
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("frame at byte {offset}: {e}")))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const TEXT: &str = "{\"a\":1}\n{\"a\":2}\n";

    fn read_all(path: &Path) -> Result<String> {
        let mut s = String::new();
        open(path)?
            .read_to_string(&mut s)
            .map_err(|e| Error::io(path, e))?;
        Ok(s)
    }

    fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(bytes).map_err(|e| Error::io("gzip", e))?;
        enc.finish().map_err(|e| Error::io("gzip", e))
    }

    fn zstd(bytes: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
    }

    #[test]
    fn plain_gzip_and_zstd_read_the_same() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let plain = dir.path().join("a.jsonl");
        let gz = dir.path().join("a.jsonl.gz");
        let zst = dir.path().join("a.jsonl.zst");
        // compressed content under a plain name is still recognised by its bytes
        let gz_unnamed = dir.path().join("b.jsonl");
        std::fs::write(&plain, TEXT).map_err(|e| Error::io(&plain, e))?;
        std::fs::write(&gz, gzip(TEXT.as_bytes())?).map_err(|e| Error::io(&gz, e))?;
        std::fs::write(&zst, zstd(TEXT.as_bytes())).map_err(|e| Error::io(&zst, e))?;
        std::fs::write(&gz_unnamed, gzip(TEXT.as_bytes())?)
            .map_err(|e| Error::io(&gz_unnamed, e))?;
        for p in [&plain, &gz, &zst, &gz_unnamed] {
            assert_eq!(read_all(p)?, TEXT, "{}", p.display());
        }
        Ok(())
    }

    #[test]
    fn concatenated_members_and_frames_are_all_read() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let (a, b) = TEXT.split_at(8);
        let gz = dir.path().join("two.gz");
        let mut bytes = gzip(a.as_bytes())?;
        bytes.extend(gzip(b.as_bytes())?);
        std::fs::write(&gz, bytes).map_err(|e| Error::io(&gz, e))?;
        let zst = dir.path().join("two.zst");
        let mut bytes = zstd(a.as_bytes());
        bytes.extend(zstd(b.as_bytes()));
        std::fs::write(&zst, bytes).map_err(|e| Error::io(&zst, e))?;
        assert_eq!(read_all(&gz)?, TEXT);
        assert_eq!(read_all(&zst)?, TEXT);
        Ok(())
    }

    #[test]
    fn extension_without_matching_content_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        for name in ["x.jsonl.gz", "x.jsonl.zst"] {
            let p = dir.path().join(name);
            std::fs::write(&p, TEXT).map_err(|e| Error::io(&p, e))?;
            match open(&p) {
                Err(Error::Decompress { path, format, .. }) => {
                    assert_eq!(path, p);
                    assert_eq!(format, Compression::from_extension(&p).name());
                }
                Err(other) => panic!("expected Decompress, got {other:?}"),
                Ok(_) => panic!("{name}: plain text accepted as compressed"),
            }
        }
        Ok(())
    }

    #[test]
    fn corrupt_zstd_names_the_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let p = dir.path().join("bad.zst");
        let mut bytes = zstd(TEXT.as_bytes());
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        match open(&p) {
            Err(Error::Decompress { path, .. }) => assert_eq!(path, p),
            Err(other) => panic!("expected Decompress, got {other:?}"),
            Ok(_) => panic!("a truncated frame was accepted"),
        }
        Ok(())
    }
}
