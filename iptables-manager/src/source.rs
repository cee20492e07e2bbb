//! Where tunnel-port records come from, behind [`RecordSource`]: a file
//! (polled for changes) or a cloud replica's admin endpoint. The cluster-mode
//! ConfigMap source implements the same trait.

use std::future::Future;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::records::{RecordError, Records};

/// Why records could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading the file failed.
    #[error("cannot read records file {path}: {cause}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        cause: std::io::Error,
    },
    /// Fetching from the URL failed.
    #[error("cannot fetch records from {url}: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The content was refused.
    #[error("records from {origin}: {cause}")]
    Invalid {
        /// File or URL.
        origin: String,
        /// The validation error.
        cause: RecordError,
    },
}

type Next<'a> = Pin<Box<dyn Future<Output = Result<Records, SourceError>> + Send + 'a>>;

/// A stream of record versions.
pub trait RecordSource: Send {
    /// Resolves with the first version at once, then with each change: a new
    /// valid version, or an error when the content turned bad or unreadable.
    /// Unchanged content never resolves again.
    fn next(&mut self) -> Next<'_>;
}

/// How long changed content must stay the same before it counts.
const SETTLE: Duration = Duration::from_millis(100);

/// Content-change detector shared by the polling sources.
struct Poller {
    origin: String,
    every: Duration,
    range: RangeInclusive<u16>,
    last: Option<Result<Bytes, String>>,
    first: bool,
}

impl Poller {
    fn new(origin: String, every: Duration, range: RangeInclusive<u16>) -> Self {
        Self {
            origin,
            every,
            range,
            last: None,
            first: true,
        }
    }

    /// Polls `fetch` until its result differs from the last one seen.
    async fn changed<F, Fut>(&mut self, mut fetch: F) -> Result<Records, SourceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Bytes, SourceError>>,
    {
        loop {
            if !std::mem::take(&mut self.first) {
                tokio::time::sleep(self.every).await;
            }
            let got = fetch().await;
            let key = match &got {
                Ok(b) => Ok(b.clone()),
                Err(e) => Err(e.to_string()),
            };
            if self.last.as_ref() == Some(&key) {
                continue;
            }
            // Act only on content that holds still: a file caught halfway
            // through a (non-atomic) write must not be reported as bad input.
            tokio::time::sleep(self.every.min(SETTLE)).await;
            let again = match fetch().await {
                Ok(b) => Ok(b),
                Err(e) => Err(e.to_string()),
            };
            if again != key {
                continue;
            }
            self.last = Some(key);
            let bytes = got?;
            return Records::parse(&bytes, &self.range).map_err(|cause| SourceError::Invalid {
                origin: self.origin.clone(),
                cause,
            });
        }
    }
}

/// Records in a JSON file, re-read every poll interval.
pub struct FileSource {
    path: PathBuf,
    poller: Poller,
}

impl FileSource {
    /// Watches `path`.
    pub fn new(path: PathBuf, every: Duration, range: RangeInclusive<u16>) -> Self {
        let origin = path.display().to_string();
        Self {
            path,
            poller: Poller::new(origin, every, range),
        }
    }
}

impl RecordSource for FileSource {
    fn next(&mut self) -> Next<'_> {
        let path = self.path.clone();
        Box::pin(self.poller.changed(move || {
            let path = path.clone();
            async move {
                tokio::fs::read(&path)
                    .await
                    .map(Bytes::from)
                    .map_err(|cause| SourceError::Read {
                        path: path.display().to_string(),
                        cause,
                    })
            }
        }))
    }
}

/// Records served over plain HTTP by a cloud replica's admin endpoint
/// (`GET /tunnelport`).
pub struct HttpSource {
    url: http::Uri,
    poller: Poller,
}

/// Largest records document accepted.
const MAX_RECORDS_BYTES: usize = 1 << 20;

impl HttpSource {
    /// Polls `url` (`http://host:port/path`).
    pub fn new(
        url: &str,
        every: Duration,
        range: RangeInclusive<u16>,
    ) -> Result<Self, SourceError> {
        let bad = |reason: &str| SourceError::Fetch {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(bad("want http://host:port/path"));
        }
        Ok(Self {
            url: uri,
            poller: Poller::new(url.to_owned(), every, range),
        })
    }
}

async fn fetch(url: &http::Uri) -> Result<Bytes, SourceError> {
    let fail = |reason: String| SourceError::Fetch {
        url: url.to_string(),
        reason,
    };
    let authority = url.authority().expect("checked in new").to_string();
    let work = async {
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::get(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(http::header::HOST, &authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("status {}", resp.status())));
        }
        Limited::new(resp.into_body(), MAX_RECORDS_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| fail(e.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| fail("timed out".into()))?
}

impl RecordSource for HttpSource {
    fn next(&mut self) -> Next<'_> {
        let url = self.url.clone();
        Box::pin(self.poller.changed(move || {
            let url = url.clone();
            async move { fetch(&url).await }
        }))
    }
}
