//! A chunk's source session, whose `COPY ... TO STDOUT` is read straight off the socket.
//!
//! tokio-postgres connects, authenticates (every method it supports), applies the session
//! settings and imports the job's snapshot, on a socket haul opened (and encrypted, as
//! `sslmode` says: `pg::connect_raw`) itself and lent to it through [`Detachable`]. Once the transaction is set up the socket is taken back and
//! the COPY is spoken directly: the driver would hand each row over as its own message
//! through a channel between tasks (a wake-up, a reference-counted buffer and a parse per
//! row, ~15% of haul's CPU), where here a read of up to [`READ_BUFFER`] bytes is cut into
//! rows in place and handed to the decoder in the reading task.
//!
//! The socket also tells the kernel to wake the reader only once 64 KiB have arrived
//! (`SO_RCVLOWAT`) instead of on each 8 KiB the server sends: on loopback the sending
//! backend pays for every wake-up, and this cut the source's system time by a third and
//! haul's wall time by 12% (BENCHMARKS.md). A read that waits longer than a few
//! milliseconds (the end of the stream, a scan that finds few rows) lowers the mark and
//! takes what there is.
//!
//! The socket is taken back only between statements, after the driver has seen
//! `ReadyForQuery`, when the server has nothing more to send; an out-of-step stream would
//! show as a protocol error, never as data.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use haul_shared::error::ErrorClass;
use haul_shared::pg::{self, Database, PgStream, SESSION_SETUP, SourceError, quote_literal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Socket reads are this large (a row bigger than this grows the buffer).
pub const READ_BUFFER: usize = 256 * 1024;
/// The kernel wakes the reader once this much has arrived (`SO_RCVLOWAT`), not on every
/// 8 KiB the server sends: on loopback the sender pays for each wake-up.
const WAKE_AT: i32 = 64 * 1024;
/// How long a read waits for [`WAKE_AT`] bytes before taking what there is (the end of
/// the stream, or a scan that finds few rows).
const WAKE_WAIT: Duration = Duration::from_millis(3);

type Socket = PgStream;

/// A chunk's session: in a `REPEATABLE READ READ ONLY` transaction on the job's snapshot
/// (when it has one), ready for its COPY.
pub struct ChunkSource {
    socket: Socket,
    dsn: String,
}

impl ChunkSource {
    /// Connects, applies [`SESSION_SETUP`] and begins the chunk's transaction, importing
    /// `snapshot`.
    pub async fn open(db: &Database, snapshot: Option<&str>) -> Result<Self, SourceError> {
        let slot = Arc::new(Mutex::new(None));
        let (client, connection) = pg::connect_raw(db, |stream| {
            *slot.lock().expect("socket slot") = Some(stream);
            Detachable(Arc::clone(&slot))
        })
        .await?;
        let driver = tokio::spawn(connection);
        let setup = async {
            client
                .batch_execute(SESSION_SETUP)
                .await
                .map_err(|e| SourceError::query("session setup", e))?;
            // A SQL_ASCII database holds any bytes, and converting them to UTF8 fails
            // server-side without naming a column: take them as stored (the COPY is read
            // here, not by the driver); the decoder checks text is UTF-8 and names the
            // column whose value is not.
            client
                .batch_execute(
                    "SELECT set_config('client_encoding', 'SQL_ASCII', false) \
                     WHERE current_setting('server_encoding') = 'SQL_ASCII'",
                )
                .await
                .map_err(|e| SourceError::query("session setup", e))?;
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| SourceError::query("beginning the chunk transaction", e))?;
            if let Some(snap) = snapshot {
                client
                    .batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(snap)))
                    .await
                    .map_err(|e| match e.code() {
                        Some(code) if code.code() == "22023" => SourceError::SnapshotLost {
                            snapshot: snap.to_owned(),
                        },
                        _ => SourceError::query("importing the job's snapshot", e),
                    })?;
            }
            Ok::<_, SourceError>(())
        };
        let setup = setup.await;
        let socket = slot.lock().expect("socket slot").take();
        // from here the driver would read end-of-stream and write into the void
        drop(client);
        driver.abort();
        setup?;
        let socket = socket.ok_or_else(|| SourceError::Query {
            context: "taking over the source connection".into(),
            reason: "the driver no longer held it".into(),
            class: ErrorClass::Transient,
        })?;
        set_wake_at(&socket, WAKE_AT);
        Ok(Self {
            socket,
            dsn: db.to_string(),
        })
    }

    /// Starts `statement` (a `COPY ... TO STDOUT (FORMAT binary)`); read it with
    /// [`CopyOut::read`].
    pub async fn copy_out(&mut self, statement: &str) -> Result<CopyOut<'_>, SourceError> {
        let mut out = BytesMut::with_capacity(statement.len() + 6);
        put_query(&mut out, statement);
        self.socket.write_all(&out).await.map_err(io_error)?;
        Ok(CopyOut {
            source: self,
            buf: BytesMut::with_capacity(READ_BUFFER),
            state: Copy::Starting,
            error: None,
        })
    }

    /// Ends the session (the read-only transaction ends with it).
    pub async fn close(mut self) {
        let _ = self.socket.write_all(&[b'X', 0, 0, 0, 4]).await;
        let _ = self.socket.shutdown().await;
    }

    fn protocol(&self, what: &str) -> SourceError {
        SourceError::Query {
            context: format!("reading COPY from {}", self.dsn),
            reason: format!("protocol out of step: {what}"),
            class: ErrorClass::Internal,
        }
    }
}

/// A COPY in progress.
pub struct CopyOut<'a> {
    source: &'a mut ChunkSource,
    buf: BytesMut,
    state: Copy,
    error: Option<SourceError>,
}

impl CopyOut<'_> {
    /// Reads once from the socket and gives every complete piece of the COPY stream in
    /// the buffer (one row, in practice) to `on_data`. `Ok(true)` while the COPY goes on,
    /// `Ok(false)` once it has ended cleanly (the server is ready for the next statement).
    pub async fn read<D>(&mut self, mut on_data: D) -> Result<bool, SourceError>
    where
        D: FnMut(&[u8]) -> Result<(), SourceError>,
    {
        if self.buf.capacity() - self.buf.len() < READ_BUFFER / 4 {
            // one message may be larger than the buffer: make room for all of it
            let need = if self.buf.len() >= 5 {
                1 + u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize
            } else {
                0
            };
            self.buf
                .reserve(need.max(READ_BUFFER).saturating_sub(self.buf.len()));
        }
        let socket = &mut self.source.socket;
        let n = match tokio::time::timeout(WAKE_WAIT, socket.read_buf(&mut self.buf)).await {
            Ok(r) => r.map_err(io_error)?,
            Err(_) => {
                // fewer than WAKE_AT bytes are waiting: lowering the mark signals them
                set_wake_at(socket, 1);
                let r = socket.read_buf(&mut self.buf).await;
                set_wake_at(socket, WAKE_AT);
                r.map_err(io_error)?
            }
        };
        if n == 0 {
            return Err(SourceError::Query {
                context: "reading COPY".into(),
                reason: "the source closed the connection".into(),
                class: ErrorClass::Transient,
            });
        }
        let mut pos = 0;
        while let Some((tag, body)) = message(&self.buf[pos..]) {
            pos += 5 + body.len();
            match (tag, self.state) {
                (b'd', Copy::Data) => on_data(body)?,
                (b'H', Copy::Starting) => {
                    if body.first() != Some(&1) {
                        return Err(self.source.protocol("a COPY that is not binary"));
                    }
                    self.state = Copy::Data;
                }
                (b'c', Copy::Data) => self.state = Copy::Done,
                (b'C', Copy::Done) => {}
                (b'E', _) => {
                    // the server follows an error with ReadyForQuery: read up to it
                    self.error = Some(error_response(body));
                    self.state = Copy::Failed;
                }
                (b'Z', Copy::Done | Copy::Failed) => {
                    self.buf.advance(pos);
                    return match self.error.take() {
                        Some(e) => Err(e),
                        None => Ok(false),
                    };
                }
                // notices, parameter changes, notifications
                (b'N' | b'S' | b'A', _) => {}
                (tag, _) => {
                    let what = format!("message {:?} during COPY", char::from(tag));
                    return Err(self.source.protocol(&what));
                }
            }
        }
        self.buf.advance(pos);
        if self.buf.len() >= 5
            && u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) < 4
        {
            return Err(self
                .source
                .protocol("a message shorter than its length field"));
        }
        Ok(true)
    }
}

fn io_error(e: io::Error) -> SourceError {
    SourceError::Query {
        context: "reading COPY".into(),
        reason: e.to_string(),
        class: ErrorClass::Transient,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Copy {
    Starting,
    Data,
    Done,
    Failed,
}

/// The next complete backend message in `buf`: its tag and body.
fn message(buf: &[u8]) -> Option<(u8, &[u8])> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
    if len < 4 || buf.len() < 1 + len {
        // incomplete (or, below 4, nonsense: the caller reports that)
        return None;
    }
    Some((buf[0], &buf[5..1 + len]))
}

/// A simple-query message.
fn put_query(out: &mut BytesMut, sql: &str) {
    out.put_u8(b'Q');
    out.put_u32((4 + sql.len() + 1) as u32);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
}

/// An `ErrorResponse` as a [`SourceError`]: the server's message and hint, classed by its
/// SQLSTATE like the driver's errors.
fn error_response(mut body: &[u8]) -> SourceError {
    let (mut code, mut message, mut hint) = (String::new(), String::new(), None);
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            b'H' => hint = Some(value),
            _ => {}
        }
        body = rest.get(end + 1..).unwrap_or(&[]);
    }
    SourceError::Query {
        context: "reading COPY".into(),
        reason: match hint {
            Some(h) => format!("{message} (hint: {h})"),
            None => message,
        },
        class: pg::sqlstate_class(&code),
    }
}

/// Sets the socket's `SO_RCVLOWAT` (TCP only; best effort: a failure only costs wake-ups).
#[allow(unsafe_code)]
fn set_wake_at(socket: &Socket, bytes: i32) {
    use std::os::fd::AsRawFd;
    let Some(tcp) = socket.tcp() else { return };
    // SAFETY: a valid open descriptor, and a pointer to an i32 with its exact length, as
    // setsockopt(2) requires for SO_RCVLOWAT.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "SO_RCVLOWAT not set");
    }
}

/// A socket lent to the driver: once taken out of the slot, reads see end-of-stream and
/// writes are discarded, so the driver winds down without touching the session.
struct Detachable(Arc<Mutex<Option<Socket>>>);

impl AsyncRead for Detachable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0.lock().expect("socket slot").as_mut() {
            Some(s) => Pin::new(s).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Detachable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.0.lock().expect("socket slot").as_mut() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.lock().expect("socket slot").as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // the session's end is the chunk's call ([`ChunkSource::close`]), never the driver's
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_whole() {
        let mut b = BytesMut::new();
        b.put_u8(b'd');
        b.put_u32(7);
        b.put_slice(b"abc");
        b.put_u8(b'c');
        b.put_u32(4);
        assert_eq!(message(&b), Some((b'd', &b"abc"[..])));
        assert_eq!(message(&b[8..]), Some((b'c', &b""[..])));
        assert_eq!(message(&b[..7]), None);
    }

    /// A fake server that answers the COPY with `reply`, then keeps the connection open.
    async fn copy_from(reply: Vec<u8>) -> ChunkSource {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut q = [0u8; 256];
            let _ = s.read(&mut q).await;
            s.write_all(&reply).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let socket = PgStream::Tcp(tokio::net::TcpStream::connect(addr).await.unwrap());
        set_wake_at(&socket, WAKE_AT);
        ChunkSource {
            socket,
            dsn: "test".into(),
        }
    }

    fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
        out.push(tag);
        out.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
    }

    #[tokio::test]
    async fn a_short_stream_ends_though_it_never_reaches_the_wake_up_mark() {
        let mut reply = Vec::new();
        msg(&mut reply, b'H', &[1, 0, 0]);
        msg(&mut reply, b'd', b"row one");
        msg(&mut reply, b'd', b"row two");
        msg(&mut reply, b'c', b"");
        msg(&mut reply, b'C', b"COPY 2\0");
        msg(&mut reply, b'Z', b"T");
        let mut src = copy_from(reply).await;
        let mut copy = src.copy_out("COPY x TO STDOUT").await.unwrap();
        let mut rows = Vec::new();
        let read = async {
            while copy
                .read(|r| {
                    rows.push(r.to_vec());
                    Ok(())
                })
                .await?
            {}
            Ok::<_, SourceError>(())
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the read waited for bytes that never come")
            .unwrap();
        assert_eq!(rows, [b"row one".to_vec(), b"row two".to_vec()]);
    }

    #[tokio::test]
    async fn a_nonsense_length_is_a_protocol_error() {
        let mut reply = Vec::new();
        msg(&mut reply, b'H', &[1, 0, 0]);
        reply.extend_from_slice(&[b'd', 0, 0, 0, 2]);
        let mut src = copy_from(reply).await;
        let mut copy = src.copy_out("COPY x TO STDOUT").await.unwrap();
        let err = loop {
            match copy.read(|_| Ok(())).await {
                Ok(true) => continue,
                Ok(false) => panic!("ended"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(err.contains("protocol out of step"), "{err}");
    }

    #[test]
    fn error_responses_keep_message_hint_and_class() {
        let body = b"SERROR\0C57014\0Mcanceling statement\0Hretry\0\0";
        match error_response(body) {
            SourceError::Query { reason, class, .. } => {
                assert_eq!(reason, "canceling statement (hint: retry)");
                assert_eq!(class, ErrorClass::Transient);
            }
            other => panic!("{other:?}"),
        }
    }
}
