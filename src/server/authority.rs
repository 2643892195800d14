//! Lets every CSI client reach the Unix socket, whatever `:authority` it
//! sends.
//!
//! gRPC clients built on the C core (Python, C++, Ruby, PHP) send the socket
//! path, percent-encoded, as the HTTP/2 `:authority` of a `unix:` channel,
//! and grpc-java sends the raw path. Neither is a valid URI authority, and
//! the HTTP/2 server under tonic resets such streams with PROTOCOL_ERROR
//! before any service sees them; it has no setting to accept them. Over a
//! Unix socket the authority carries nothing (the path already names the
//! peer), so [`FixAuthority`] wraps each accepted connection and rewrites
//! the client-to-server byte stream:
//!
//! * HTTP/2 frames are parsed; everything but HEADERS and CONTINUATION
//!   passes through untouched (DATA payloads are streamed, not buffered).
//! * Each header block (a HEADERS frame and its CONTINUATION frames) is
//!   decoded with an HPACK decoder that follows the client's encoder (its
//!   dynamic table), an `:authority` that is not a valid URI authority
//!   becomes `localhost`, and the block is re-encoded with every field a
//!   literal without indexing, so the server's HPACK decoder never needs
//!   its dynamic table and stays consistent; padding is dropped, priority
//!   kept, and the block is split into frames of at most 16 KiB (the
//!   smallest frame size a peer must accept).
//!
//! A block that cannot be decoded, or that breaks the framing rules, closes
//! the connection (the server would have closed it with a connection error
//! anyway). The server-to-client direction is not touched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::encoder::encode_integer_into;
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What an invalid `:authority` becomes.
const REPLACEMENT: &[u8] = b"localhost";
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
/// The largest frame payload every HTTP/2 peer accepts.
const MAX_FRAME: usize = 16_384;
/// Limits on one header block, encoded and decoded (HPACK size: name +
/// value + 32 per field); far above what a CSI client sends.
const MAX_BLOCK: usize = 1 << 20;
const MAX_HEADER_LIST: usize = 1 << 20;
/// The header table size a server that announces none lets clients use.
const HEADER_TABLE_SIZE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Where the parser is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting the 24-byte connection preface (passed on as it is).
    Preface,
    /// Collecting a 9-byte frame header.
    FrameHeader,
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    HeaderPayload {
        kind: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
    /// Passing this many more payload bytes of another frame through.
    Pass(usize),
}

/// A header block waiting for its CONTINUATION frames.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server rewriting, independent of any I/O.
pub(crate) struct Rewriter {
    state: State,
    pending: Vec<u8>,
    block: Option<OpenBlock>,
    decoder: Decoder<'static>,
    rewritten: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            state: State::Preface,
            pending: Vec::new(),
            block: None,
            decoder,
            rewritten: 0,
        }
    }
}

impl Rewriter {
    /// Consumes `input` (any split of the stream) and appends what the
    /// server should read to `out`.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            match self.state {
                State::Preface => {
                    if !self.collect(&mut input, PREFACE_LEN) {
                        return Ok(());
                    }
                    out.append(&mut self.pending);
                    self.state = State::FrameHeader;
                }
                State::FrameHeader => {
                    if !self.collect(&mut input, FRAME_HEADER_LEN) {
                        return Ok(());
                    }
                    let h = std::mem::take(&mut self.pending);
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if kind == HEADERS || kind == CONTINUATION {
                        if len > MAX_BLOCK {
                            return Err(protocol("header block too large"));
                        }
                        self.state = State::HeaderPayload {
                            kind,
                            flags,
                            stream,
                            len,
                        };
                    } else {
                        if self.block.is_some() {
                            return Err(protocol("a header block was interrupted"));
                        }
                        out.extend_from_slice(&h);
                        self.state = State::Pass(len);
                    }
                }
                State::HeaderPayload {
                    kind,
                    flags,
                    stream,
                    len,
                } => {
                    if !self.collect(&mut input, len) {
                        return Ok(());
                    }
                    let payload = std::mem::take(&mut self.pending);
                    self.header_frame(kind, flags, stream, &payload, out)?;
                    self.state = State::FrameHeader;
                }
                State::Pass(0) => self.state = State::FrameHeader,
                State::Pass(n) => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let k = n.min(input.len());
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    self.state = State::Pass(n - k);
                }
            }
        }
    }

    /// How many `:authority` values were replaced so far.
    pub(crate) fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Moves bytes from `input` into `pending` until it holds `want`;
    /// whether it does.
    fn collect(&mut self, input: &mut &[u8], want: usize) -> bool {
        let k = want.saturating_sub(self.pending.len()).min(input.len());
        self.pending.extend_from_slice(&input[..k]);
        *input = &input[k..];
        self.pending.len() == want
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(protocol("a header block was interrupted"));
            }
            let mut start = 0;
            let mut pad = 0;
            if flags & PADDED != 0 {
                pad = usize::from(*payload.first().ok_or_else(|| protocol("bad padding"))?);
                start = 1;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let p = payload
                    .get(start..start + 5)
                    .ok_or_else(|| protocol("bad priority"))?;
                priority = Some(<[u8; 5]>::try_from(p).expect("five bytes"));
                start += 5;
            }
            if start + pad > payload.len() {
                return Err(protocol("bad padding"));
            }
            self.block = Some(OpenBlock {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: payload[start..payload.len() - pad].to_vec(),
            });
        } else {
            let block = self
                .block
                .as_mut()
                .filter(|b| b.stream == stream)
                .ok_or_else(|| protocol("CONTINUATION outside a header block"))?;
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(protocol("header block too large"));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("an open block");
            self.finish(block, out)?;
        }
        Ok(())
    }

    /// Decodes a whole block, fixes `:authority`, writes it out as literals.
    fn finish(&mut self, block: OpenBlock, out: &mut Vec<u8>) -> io::Result<()> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                // Keep decoding past the limit (the table must follow the
                // client), but stop keeping fields.
                size += name.len() + value.len() + 32;
                if size <= MAX_HEADER_LIST {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| protocol(format!("HPACK: {e:?}")))?;
        if size > MAX_HEADER_LIST {
            return Err(protocol("header list too large"));
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for (name, value) in &fields {
            let mut value = value.as_slice();
            if name == b":authority" && http::uri::Authority::try_from(value).is_err() {
                value = REPLACEMENT;
                self.rewritten += 1;
            }
            literal(name, value, &mut encoded);
        }
        write_block(&block, &encoded, out);
        Ok(())
    }
}

/// One field as a literal without indexing, with a literal name and no
/// Huffman coding.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        encode_integer_into(s.len(), 7, 0x00, out).expect("writing to a Vec");
        out.extend_from_slice(s);
    }
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// A HEADERS frame and as many CONTINUATION frames as `encoded` needs.
fn write_block(block: &OpenBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let prefix = if block.priority.is_some() { 5 } else { 0 };
    let first = encoded.len().min(MAX_FRAME - prefix);
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if first == encoded.len() {
        flags |= END_HEADERS;
    }
    frame_header(prefix + first, HEADERS, flags, block.stream, out);
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(&encoded[..first]);
    let mut rest = &encoded[first..];
    while !rest.is_empty() {
        let k = rest.len().min(MAX_FRAME);
        let flags = if k == rest.len() { END_HEADERS } else { 0 };
        frame_header(k, CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(&rest[..k]);
        rest = &rest[k..];
    }
}

/// A server-side connection whose client-to-server stream goes through a
/// [`Rewriter`]; writes pass straight through.
pub struct FixAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    raw: Box<[u8]>,
    out: Vec<u8>,
    out_pos: usize,
    logged: bool,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        FixAuthority {
            inner,
            rewriter: Rewriter::default(),
            raw: vec![0; 16 * 1024].into_boxed_slice(),
            out: Vec::new(),
            out_pos: 0,
            logged: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let k = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + k]);
                this.out_pos += k;
                return Poll::Ready(Ok(()));
            }
            this.out.clear();
            this.out_pos = 0;
            let mut raw = ReadBuf::new(&mut this.raw);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.rewriter.feed(raw.filled(), &mut this.out)?;
            if !this.logged && this.rewriter.rewritten() > 0 {
                this.logged = true;
                tracing::debug!("a client sent an invalid :authority; serving it as localhost");
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for FixAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn request(authority: &str) -> Fields {
        fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/csi.v1.Identity/Probe"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])
    }

    /// A client's HPACK encoding: indexes what it can (dynamic table).
    fn encode(enc: &mut Encoder<'static>, f: &Fields) -> Vec<u8> {
        enc.encode(f.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(payload.len(), kind, flags, stream, &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// What the server decodes: (kind, flags, stream, payload) per frame,
    /// after the preface.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        bytes = &bytes[PREFACE_LEN..];
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    /// Feeds `input` in pieces of `chunk` bytes.
    fn rewrite(input: &[u8], chunk: usize) -> (Vec<u8>, Rewriter) {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            r.feed(piece, &mut out).unwrap();
        }
        (out, r)
    }

    /// Decodes the header blocks the server would see, with a decoder that
    /// has a zero-size dynamic table: the rewritten blocks must not use it.
    fn server_view(out: &[u8]) -> Vec<Fields> {
        let mut dec = Decoder::new();
        dec.set_max_table_size(0);
        let mut blocks = Vec::new();
        let mut current = Vec::new();
        for (kind, flags, _, payload) in frames(out) {
            if kind != HEADERS && kind != CONTINUATION {
                continue;
            }
            assert!(payload.len() <= MAX_FRAME);
            let start = if kind == HEADERS && flags & PRIORITY != 0 {
                5
            } else {
                0
            };
            assert_eq!(flags & PADDED, 0);
            current.extend_from_slice(&payload[start..]);
            if flags & END_HEADERS != 0 {
                blocks.push(dec.decode(&current).unwrap());
                current.clear();
            }
        }
        blocks
    }

    #[test]
    fn invalid_authorities_become_localhost_and_the_rest_is_kept() {
        let mut enc = Encoder::new();
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        // Three requests: the later ones refer to the client's dynamic table.
        let authorities = ["%2Frun%2Fcsi.sock", "/run/csi.sock", "localhost:50051"];
        for (i, a) in authorities.iter().enumerate() {
            let block = encode(&mut enc, &request(a));
            input.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i as u32, &block));
            input.extend(frame(0x0, END_STREAM, 1 + 2 * i as u32, b"\0\0\0\0\0"));
        }
        for chunk in [1, 7, 4096] {
            let (out, r) = rewrite(&input, chunk);
            assert_eq!(r.rewritten(), 2);
            let blocks = server_view(&out);
            assert_eq!(blocks[0], request("localhost"));
            assert_eq!(blocks[1], request("localhost"));
            assert_eq!(blocks[2], request("localhost:50051"));
            // Everything else went through byte for byte.
            let f = frames(&out);
            assert_eq!(f[0], (0x4, 0, 0, settings[9..].to_vec()));
            assert_eq!(f[2], (0x0, END_STREAM, 1, b"\0\0\0\0\0".to_vec()));
            assert_eq!(f.len(), 7);
        }
    }

    #[test]
    fn padding_priority_and_continuations_are_handled() {
        let mut enc = Encoder::new();
        let block = encode(&mut enc, &request("%2Ftmp%2Fx.sock"));
        let (a, b) = block.split_at(block.len() / 2);
        // HEADERS with padding (3 bytes) and priority, then CONTINUATION.
        let mut payload = vec![3];
        payload.extend([0x80, 0, 0, 0, 15]);
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_STREAM | PADDED | PRIORITY, 5, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let (out, _) = rewrite(&input, 3);
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        let (kind, flags, stream, payload) = &f[0];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, END_STREAM | PRIORITY | END_HEADERS, 5)
        );
        assert_eq!(payload[..5], [0x80, 0, 0, 0, 15]);
        assert_eq!(server_view(&out), vec![request("localhost")]);
    }

    #[test]
    fn large_blocks_are_split_into_frames_the_server_accepts() {
        let mut enc = Encoder::new();
        let mut list = request("%2Fa");
        list.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
        let block = encode(&mut enc, &list);
        let mut input = PREFACE.to_vec();
        for piece in block.chunks(10_000).enumerate() {
            let (i, p) = piece;
            let last = (i + 1) * 10_000 >= block.len();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, p));
        }
        let (out, _) = rewrite(&input, 999);
        let f = frames(&out);
        assert!(f.len() >= 3);
        assert_eq!(f[0].0, HEADERS);
        assert!(f[1..].iter().all(|x| x.0 == CONTINUATION));
        let mut expect = list.clone();
        expect[3].1 = b"localhost".to_vec();
        assert_eq!(server_view(&out), vec![expect]);
    }

    #[test]
    fn broken_framing_and_bad_hpack_close_the_connection() {
        let mut enc = Encoder::new();
        let block = encode(&mut enc, &request("%2Fa"));
        let cases = [
            // CONTINUATION without HEADERS
            frame(CONTINUATION, END_HEADERS, 1, &block),
            // another frame inside a header block
            [frame(HEADERS, 0, 1, &block), frame(0x0, 0, 1, b"x")].concat(),
            // CONTINUATION of another stream
            [
                frame(HEADERS, 0, 1, &block),
                frame(CONTINUATION, END_HEADERS, 3, b""),
            ]
            .concat(),
            // an index past every table
            frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]),
            // padding longer than the frame
            frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
            // a table size above what the server allows
            frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x7f, 0x82]),
        ];
        for case in cases {
            let mut r = Rewriter::default();
            let mut out = Vec::new();
            let input = [PREFACE, &case].concat();
            assert!(r.feed(&input, &mut out).is_err(), "{case:?}");
        }
    }

    #[tokio::test]
    async fn the_adapter_rewrites_what_the_server_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let mut server = FixAuthority::new(server);
        let mut enc = Encoder::new();
        let block = encode(&mut enc, &request("%2Frun%2Fcsi.sock"));
        let input = [PREFACE.to_vec(), frame(HEADERS, END_HEADERS, 1, &block)].concat();
        let (mut cr, mut cw) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            cw.write_all(&input).await.unwrap();
            cw.shutdown().await.unwrap();
            cw
        });
        let mut out = Vec::new();
        server.read_to_end(&mut out).await.unwrap();
        assert_eq!(server_view(&out), vec![request("localhost")]);
        // The other direction is untouched.
        server.write_all(b"reply").await.unwrap();
        let mut reply = [0; 5];
        cr.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
        writer.await.unwrap();
    }
}
