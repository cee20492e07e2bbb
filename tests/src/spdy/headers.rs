//! SPDY/3 name/value header blocks (draft 3.1, section 2.6.10): the block format,
//! and its zlib compression primed with the draft's dictionary, one context per
//! direction per connection. Every length is checked against the bytes that are
//! there, and inflating stops at [`MAX_HEADER_BLOCK`].

use bytes::{Buf, BufMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::{Headers, MAX_HEADER_BLOCK, MAX_HEADER_PAIRS, SpdyError};

/// zlib calls per header block: the output grows by doubling up to
/// [`MAX_HEADER_BLOCK`], so a few dozen are plenty.
const MAX_ZLIB_STEPS: usize = 64;

/// The draft's zlib dictionary (section 2.6.10.1), built from its words: the
/// length-prefixed header names and methods, then one run of common values.
pub static DICTIONARY: [u8; DICTIONARY_LEN] = build_dictionary();
/// Length of [`DICTIONARY`].
pub const DICTIONARY_LEN: usize = 1423;

const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

const fn build_dictionary() -> [u8; DICTIONARY_LEN] {
    let mut out = [0u8; DICTIONARY_LEN];
    let mut at = 0;
    let mut w = 0;
    while w < DICTIONARY_WORDS.len() {
        let word = DICTIONARY_WORDS[w].as_bytes();
        w += 1;
        let len = (word.len() as u32).to_be_bytes();
        let mut i = 0;
        while i < 4 {
            out[at] = len[i];
            at += 1;
            i += 1;
        }
        let mut i = 0;
        while i < word.len() {
            out[at] = word[i];
            at += 1;
            i += 1;
        }
    }
    let tail = DICTIONARY_TAIL.as_bytes();
    let mut i = 0;
    while i < tail.len() {
        out[at] = tail[i];
        at += 1;
        i += 1;
    }
    assert!(at == DICTIONARY_LEN, "the SPDY/3 dictionary is 1423 bytes");
    out
}

/// The compressing side of a connection's header blocks (one per direction).
pub struct HeaderDeflater {
    z: Compress,
}

impl HeaderDeflater {
    /// A fresh context primed with [`DICTIONARY`].
    pub fn new() -> Result<Self, SpdyError> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&DICTIONARY)
            .map_err(|e| SpdyError::Compression(e.to_string()))?;
        Ok(Self { z })
    }

    /// Appends the compressed block for `headers` to `out`, ending in a sync flush
    /// so the peer can decode it on its own.
    pub fn deflate(
        &mut self,
        headers: &[(String, String)],
        out: &mut Vec<u8>,
    ) -> Result<(), SpdyError> {
        let plain = encode_header_block(headers)?;
        let start = self.z.total_in();
        for _ in 0..MAX_ZLIB_STEPS {
            out.reserve(plain.len() / 2 + 64);
            let done = (self.z.total_in() - start) as usize;
            self.z
                .compress_vec(&plain[done..], out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            // A sync flush is complete when zlib returns with output space left.
            if (self.z.total_in() - start) as usize == plain.len() && out.len() < out.capacity() {
                return Ok(());
            }
        }
        Err(SpdyError::Compression("deflate made no progress".into()))
    }
}

/// The decompressing side of a connection's header blocks (one per direction).
pub struct HeaderInflater {
    z: Decompress,
}

impl Default for HeaderInflater {
    fn default() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }
}

impl HeaderInflater {
    /// Decompresses one block (the zlib context carries over between blocks) and
    /// parses it; at most [`MAX_HEADER_BLOCK`] bytes are ever produced.
    pub fn inflate(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let mut plain = Vec::with_capacity(1024);
        let start = self.z.total_in();
        for _ in 0..MAX_ZLIB_STEPS {
            if plain.len() == plain.capacity() {
                if plain.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::HeaderBlock("over the size limit"));
                }
                plain.reserve_exact(plain.len().min(MAX_HEADER_BLOCK - plain.len()));
            }
            let done = (self.z.total_in() - start) as usize;
            match self
                .z
                .decompress_vec(&block[done..], &mut plain, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => {
                    return Err(SpdyError::Compression("zlib stream ended".into()));
                }
                Ok(Status::Ok | Status::BufError) => {
                    let done = (self.z.total_in() - start) as usize;
                    if done == block.len() && plain.len() < plain.capacity() {
                        return decode_header_block(&plain);
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| SpdyError::Compression(format!("dictionary: {e}")))?;
                }
                Err(e) => return Err(SpdyError::Compression(e.to_string())),
            }
        }
        Err(SpdyError::Compression("inflate made no progress".into()))
    }
}

fn encode_header_block(headers: &[(String, String)]) -> Result<Vec<u8>, SpdyError> {
    if headers.len() > MAX_HEADER_PAIRS {
        return Err(SpdyError::HeaderBlock("too many pairs"));
    }
    let mut out = Vec::new();
    out.put_u32(headers.len() as u32);
    for (name, value) in headers {
        for s in [name.to_ascii_lowercase().as_bytes(), value.as_bytes()] {
            out.put_u32(s.len() as u32);
            out.put_slice(s);
        }
    }
    if out.len() > MAX_HEADER_BLOCK {
        return Err(SpdyError::HeaderBlock("over the size limit"));
    }
    Ok(out)
}

pub(super) fn decode_header_block(mut plain: &[u8]) -> Result<Headers, SpdyError> {
    fn field(plain: &mut &[u8]) -> Result<String, SpdyError> {
        if plain.remaining() < 4 {
            return Err(SpdyError::HeaderBlock("truncated length"));
        }
        let len = plain.get_u32() as usize;
        if len > plain.remaining() {
            return Err(SpdyError::HeaderBlock("length past the end"));
        }
        let s = std::str::from_utf8(&plain[..len])
            .map_err(|_| SpdyError::HeaderBlock("not UTF-8"))?
            .to_owned();
        plain.advance(len);
        Ok(s)
    }
    if plain.remaining() < 4 {
        return Err(SpdyError::HeaderBlock("truncated pair count"));
    }
    let count = plain.get_u32() as usize;
    if count > MAX_HEADER_PAIRS {
        return Err(SpdyError::HeaderBlock("too many pairs"));
    }
    let mut headers = Headers::with_capacity(count);
    for _ in 0..count {
        let name = field(&mut plain)?;
        let value = field(&mut plain)?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(SpdyError::HeaderBlock("empty or uppercase name"));
        }
        if headers.iter().any(|(n, _)| *n == name) {
            return Err(SpdyError::HeaderBlock("duplicate name"));
        }
        headers.push((name, value));
    }
    if plain.has_remaining() {
        return Err(SpdyError::HeaderBlock("bytes after the last pair"));
    }
    Ok(headers)
}
