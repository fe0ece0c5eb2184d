//! Sockets and threads: N worker threads, each a single-threaded runtime with its own listening
//! socket on the same port (SO_REUSEPORT, the kernel spreads connections), plus one admin thread.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::admin;
use crate::drain::{self, Drain};
use crate::framing::{HeadFlags, Watched};
use crate::http1;
use crate::hyper_path::handle;
use crate::recorder::Metrics;
use crate::table::{RouteTable, RoutesDoc};
use crate::worker::{ClientInfo, Connection, ProxyOptions, Shared, Worker};

/// Everything `coalmine proxy` needs to run.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub threads: usize,
    /// The route table: its services, in precedence's last tie-break order.
    pub routes: Vec<RoutesDoc>,
    pub tls: Option<TlsFiles>,
    pub proxy: ProxyOptions,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Largest request head accepted (HTTP/1.1 answers 431 beyond it).
    pub max_header_bytes: usize,
    /// How long a kept-alive HTTP/1.1 client connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests before closing their connections.
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RouterConfig {
    /// A router run inside another command (the demo, `serve`): one worker, plain HTTP, the
    /// proxy's default timeouts, a short drain.
    pub fn embedded(listen: SocketAddr, admin: SocketAddr, routes: RoutesDoc) -> RouterConfig {
        RouterConfig {
            listen,
            admin,
            threads: 1,
            routes: vec![routes],
            tls: None,
            proxy: ProxyOptions::default(),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(75),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cause is in the message, not a `source`: shown once however it is printed.
    #[error("cannot listen on {addr}: {cause}")]
    Bind { addr: SocketAddr, cause: io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("route table: {0}")]
    Routes(#[from] crate::table::Invalid),
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
}

/// A running router.
pub struct RouterHandle {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl RouterHandle {
    /// Stops accepting, lets in-flight requests finish (up to the drain timeout) and returns
    /// when every thread has ended.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// The current route table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.shared.table.load_full()
    }
}

fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A TLS acceptor for a certificate chain and key in PEM files (ALPN h2 and http/1.1): the
/// router's, and `serve`'s API's.
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| StartError::Tls(format!("{}: {e}", p.display())))
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartError::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "{}: no certificate found",
            files.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| StartError::Tls(format!("{}: {e}", files.key.display())))?
        .ok_or_else(|| StartError::Tls(format!("{}: no private key found", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds every socket, then starts the threads. Binding first means a port conflict is reported
/// before anything runs.
pub fn start(config: RouterConfig) -> Result<RouterHandle, StartError> {
    let threads = config.threads.max(1);
    let first = bind(config.listen, threads > 1).map_err(|cause| StartError::Bind {
        addr: config.listen,
        cause,
    })?;
    let listen = first.local_addr().map_err(|cause| StartError::Bind {
        addr: config.listen,
        cause,
    })?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(bind(listen, true).map_err(|cause| StartError::Bind {
            addr: listen,
            cause,
        })?);
    }
    let admin_listener = bind(config.admin, false).map_err(|cause| StartError::Bind {
        addr: config.admin,
        cause,
    })?;
    let admin = admin_listener
        .local_addr()
        .map_err(|cause| StartError::Bind {
            addr: config.admin,
            cause,
        })?;
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let instance = format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(&now.as_nanos().to_le_bytes())
    );
    let metrics = Arc::new(Metrics::new(instance, now.as_millis() as u64));
    let table = RouteTable::new(config.routes.clone(), 1, &metrics)?;
    let options = ProxyOptions {
        client_stall_timeout: config.idle_timeout,
        ..config.proxy.clone()
    };
    let shared = Arc::new(Shared::new(table, metrics, options));
    let (stop, stopped) = watch::channel(false);
    let mut handles = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let worker = Worker::new(shared.clone());
        let stopped = stopped.clone();
        let config = config.clone();
        let tls = tls.clone();
        let h = std::thread::Builder::new()
            .name(format!("coalmine-worker-{i}"))
            .spawn(move || run_worker(listener, worker, config, tls, stopped))
            .map_err(StartError::Thread)?;
        handles.push(h);
    }
    let admin_shared = shared.clone();
    let h = std::thread::Builder::new()
        .name("coalmine-admin".into())
        .spawn(move || admin::run(admin_listener, admin_shared, stopped))
        .map_err(StartError::Thread)?;
    handles.push(h);
    Ok(RouterHandle {
        listen,
        admin,
        shared,
        stop,
        threads: handles,
    })
}

/// How long a listener stops accepting when the process is out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Tasks a worker runs between forced checks for new socket events (tokio's default is 61). A
/// proxied request takes about five task polls, so the default made an epoll_wait every dozen
/// requests even while the run queue was full; the queue emptying still checks at once.
const EVENT_INTERVAL: u32 = 256;

fn run_worker(
    listener: StdListener,
    worker: Worker,
    config: RouterConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stopped: watch::Receiver<bool>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build()
        .expect("a single-threaded tokio runtime");
    crate::upstream::set_max_idle(config.proxy.max_idle_per_upstream);
    // The worker's requests arm two timeouts each; the coarse timer's tick is a small fraction
    // of the shorter one, so neither fires noticeably late.
    let tick = (config
        .proxy
        .response_timeout
        .min(config.header_read_timeout)
        / 20)
        .clamp(Duration::from_millis(1), Duration::from_millis(100));
    rt.block_on(async move {
        tokio::spawn(crate::timer::sweeper(tick));
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener on runtime");
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(crate::timer::CoarseTimer)
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .keep_alive(true)
            // Copy the body behind the head and send one buffer: for the small responses that
            // dominate, cheaper than queueing both for a vectored write.
            .writev(false);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(config.max_header_bytes as u32);
        let builder = Arc::new(builder);
        let limits = Arc::new(http1::Limits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            max_header_bytes: config.max_header_bytes,
        });
        let drain = Drain::default();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        worker.shared.metrics.connections_accepted.fetch_add(1, Relaxed);
                        let _ = stream.set_nodelay(true);
                        serve(stream, peer, &worker, &builder, &limits, &drain, tls.clone());
                    }
                    Err(e) if crate::upstream::is_local_exhaustion(&e) => {
                        // The pending connection stays queued and the error would come back at
                        // once: pause accepting (nginx waits 500 ms) while the connections
                        // already open keep being served.
                        let metrics = &worker.shared.metrics;
                        if metrics.accept_errors.fetch_add(1, Relaxed) == 0 {
                            tracing::error!("cannot accept connections: {e}; pausing accepts");
                        }
                        tokio::select! {
                            _ = stopped.changed() => break,
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                    // The peer gave up before accept (ECONNABORTED) and the like: the next one.
                    Err(_) => {}
                },
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(config.drain_timeout, drain.shutdown()).await;
    });
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    worker: &Worker,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    limits: &Arc<http1::Limits>,
    drain: &Drain,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let (worker, builder, limits) = (worker.clone(), builder.clone(), limits.clone());
    let guard = drain.enter();
    // The TLS handshake runs inside the task, so a slow client never stalls accepting.
    // Connections still handshaking when shutdown starts are simply dropped.
    tokio::spawn(async move {
        match tls {
            None => serve_io(stream, peer, false, worker, &builder, &limits, guard).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                if let Ok(Ok(tls_stream)) = handshake.await {
                    serve_io(tls_stream, peer, true, worker, &builder, &limits, guard).await;
                }
            }
        }
    });
}

/// Serves one client connection until it closes or shutdown drains it: plain HTTP/1.1 requests
/// in this task ([`http1`]), and from the first request that path leaves to hyper (HTTP/2,
/// upgrades, anything unusual) hyper, with the bytes already read.
async fn serve_io<I>(
    mut io: I,
    peer: SocketAddr,
    tls: bool,
    worker: Worker,
    builder: &auto::Builder<TokioExecutor>,
    limits: &http1::Limits,
    mut guard: drain::Guard,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let head = HeadFlags::new(limits.max_header_bytes);
    let conn = Arc::new(Connection {
        worker,
        client: ClientInfo::new(peer, tls, head.clone()),
    });
    let read = match http1::serve(&mut io, &conn, limits, &mut guard).await {
        http1::Ended::Closed => return,
        http1::Ended::Handoff { read } => read,
    };
    let activity = Arc::new(Activity::new());
    let svc = {
        let activity = activity.clone();
        service_fn(move |req| {
            let busy = activity.enter();
            let answered = handle(conn.clone(), req);
            async move {
                // Busy until the answer's body has gone (or the client left): a long download
                // is not an idle connection.
                let answer = answered.await?;
                Ok::<_, std::convert::Infallible>(
                    answer.map(|body| Answering { body, _busy: busy }),
                )
            }
        })
    };
    let io = TokioIo::new(Watched::new(io, head, read));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    let (first, idle) = (limits.header_read_timeout, limits.idle_timeout);
    let asked = activity.clone().idle_for_too_long(first, idle);
    let served = drain::watch(conn, guard, asked, |c| c.graceful_shutdown());
    // An idle connection asked to close gets a header timeout's grace, then is dropped: an
    // HTTP/2 peer that never acknowledges the closing PING would otherwise keep it open.
    let abandoned = async {
        activity.clone().idle_for_too_long(first, idle).await;
        crate::timer::Sleep::until(std::time::Instant::now() + first).await;
    };
    tokio::select! {
        _ = served => {}
        () = abandoned => {}
    }
}

/// Requests a hyper-served connection (HTTP/2, or HTTP/1 handed over) is handling, from the
/// request until its answer's body has gone, and since when it has had none: hyper closes
/// neither an HTTP/2 connection that never sends a request nor one that stays idle, so the
/// router does.
struct Activity {
    origin: std::time::Instant,
    busy: std::sync::atomic::AtomicUsize,
    /// Requests answered so far (the first request gets the header read timeout).
    answered: std::sync::atomic::AtomicU64,
    /// Microseconds after `origin` when the last request was answered.
    last_micros: std::sync::atomic::AtomicU64,
}

struct Busy(Arc<Activity>);

/// An answer's body, holding its request's [`Busy`] until hyper has sent it whole or dropped
/// it.
struct Answering<B> {
    body: B,
    _busy: Busy,
}

impl<B: http_body::Body + Unpin> http_body::Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_micros
            .store(a.origin.elapsed().as_micros() as u64, Relaxed);
        a.answered.fetch_add(1, Relaxed);
        a.busy.fetch_sub(1, Relaxed);
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: std::time::Instant::now(),
            busy: 0.into(),
            answered: 0.into(),
            last_micros: 0.into(),
        }
    }

    fn enter(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Relaxed);
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle` (for
    /// `first_request` before its first request).
    async fn idle_for_too_long(self: Arc<Self>, first_request: Duration, idle: Duration) {
        loop {
            let limit = if self.answered.load(Relaxed) == 0 {
                first_request
            } else {
                idle
            };
            let since = self.origin + Duration::from_micros(self.last_micros.load(Relaxed));
            let Some(deadline) = since.checked_add(limit) else {
                return std::future::pending().await;
            };
            let now = std::time::Instant::now();
            if self.busy.load(Relaxed) > 0 {
                crate::timer::Sleep::until(now + limit).await;
            } else if deadline <= now {
                return;
            } else {
                crate::timer::Sleep::until(deadline).await;
            }
        }
    }
}
