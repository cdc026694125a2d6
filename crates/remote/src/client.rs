//! A blocking client for one remote store, over the `object_store` crate
//! and a small runtime of its own.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};

use crate::error::{RemoteError, Result, io};
use crate::url::RemoteUrl;

/// Objects larger than this go up in parts.
const MULTIPART_FROM: u64 = 16 << 20;
/// Size of a part.
const PART: usize = 8 << 20;
/// Parts in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// A client for the objects under one `s3://BUCKET/PREFIX`.
pub struct Client {
    url: RemoteUrl,
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.url)
    }
}

impl Client {
    /// A client for `url`, set up the way S3 tools are, from the
    /// environment: `AWS_ENDPOINT_URL` (an `http://` endpoint is allowed),
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`. Requests use path-style
    /// addressing (as Garage, MinIO and Ceph expect) and give up after a
    /// few retries, so that a wrong endpoint fails in seconds.
    pub fn from_env(url: &RemoteUrl) -> Result<Client> {
        let setup = |why: String| RemoteError::Setup {
            url: url.to_string(),
            why,
        };
        let endpoint = std::env::var("AWS_ENDPOINT_URL").ok();
        let http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_virtual_hosted_style_request(false)
            // allow_http goes on the client options themselves: options set
            // afterwards would replace the builder's.
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(http)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            });
        if let Some(e) = endpoint {
            builder = builder.with_endpoint(e);
        }
        let store = builder.build().map_err(|e| setup(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("consnap-s3")
            .enable_all()
            .build()
            .map_err(|e| setup(format!("cannot start its runtime: {e}")))?;
        Ok(Client {
            url: url.clone(),
            store: Arc::new(store),
            rt,
        })
    }

    /// The store's URL.
    pub fn url(&self) -> &RemoteUrl {
        &self.url
    }

    fn key(&self, name: &str) -> Key {
        Key::from(self.url.key(name))
    }

    fn err(&self, op: &'static str, name: &str) -> impl FnOnce(object_store::Error) -> RemoteError + use<> {
        let key = self.url.key(name);
        let url = self.url.to_string();
        move |source| RemoteError::Request {
            op,
            key,
            url,
            why: crate::error::one_line(&source),
        }
    }

    /// Put `data` as object `name`.
    pub fn put(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let key = self.key(name);
        self.rt
            .block_on(self.store.put(&key, PutPayload::from(data)))
            .map(drop)
            .map_err(self.err("PUT", name))
    }

    /// Put the first `len` bytes of `file` as object `name`: in one request,
    /// or in parts for large files. `file` is read with `pread`, so the
    /// caller's descriptor (of a file that reclamation may replace or remove
    /// meanwhile) is what goes up.
    pub fn put_file(&self, name: &str, file: &File, len: u64, path: &std::path::Path) -> Result<()> {
        let read = |at: u64, buf: &mut [u8]| file.read_exact_at(buf, at).map_err(io("read", path));
        if len <= MULTIPART_FROM {
            let mut buf = vec![0u8; len as usize];
            read(0, &mut buf)?;
            return self.put(name, buf);
        }
        let key = self.key(name);
        self.rt.block_on(async {
            let upload = self
                .store
                .put_multipart(&key)
                .await
                .map_err(self.err("start multipart upload of", name))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; PART];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(PART as u64) as usize;
                if let Err(e) = read(at, &mut buf[..n]) {
                    let _ = w.abort().await;
                    return Err(e);
                }
                w.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(self.err("upload a part of", name))?;
                w.write(&buf[..n]);
                at += n as u64;
            }
            w.finish()
                .await
                .map(drop)
                .map_err(self.err("finish multipart upload of", name))
        })
    }

    /// Object `name`, or `None` if there is none.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(name);
        let r = self.rt.block_on(async {
            match self.store.get(&key).await {
                Ok(g) => g.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        r.map(|b| b.map(|b| b.to_vec())).map_err(self.err("GET", name))
    }

    /// Bytes `range` of object `name`.
    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let key = self.key(name);
        self.rt
            .block_on(self.store.get_range(&key, range))
            .map(|b| b.to_vec())
            .map_err(self.err("GET (range)", name))
    }

    /// Objects directly under `dir` (relative to the prefix): (name
    /// relative to the prefix, size).
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let key = self.key(dir);
        let r = self
            .rt
            .block_on(self.store.list_with_delimiter(Some(&key)))
            .map_err(self.err("LIST", dir))?;
        let base = if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        };
        Ok(r.objects
            .into_iter()
            .filter_map(|o| {
                let full = o.location.to_string();
                full.strip_prefix(&base).map(|n| (n.to_string(), o.size))
            })
            .collect())
    }

    /// Delete object `name` (gone already is fine).
    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        match self.rt.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("DELETE", name)(e)),
        }
    }

    /// Fetch object `name` into `path` with up to `parallel` ranged GETs
    /// at once, writing each range in place.
    pub fn get_to_file(
        &self,
        name: &str,
        len: u64,
        file: &File,
        path: &std::path::Path,
        parallel: usize,
    ) -> Result<()> {
        let key = self.key(name);
        let ranges: Vec<Range<u64>> = (0..len.div_ceil(PART as u64))
            .map(|i| i * PART as u64..((i + 1) * PART as u64).min(len))
            .collect();
        for group in ranges.chunks(parallel.max(1)) {
            let parts = self.rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for r in group {
                    let (store, key, r) = (self.store.clone(), key.clone(), r.clone());
                    set.spawn(async move { (r.start, store.get_range(&key, r).await) });
                }
                let mut out = Vec::new();
                while let Some(j) = set.join_next().await {
                    out.push(j);
                }
                out
            });
            for p in parts {
                let (at, bytes) = p.map_err(|e| RemoteError::Setup {
                    url: self.url.to_string(),
                    why: format!("a download task failed: {e}"),
                })?;
                let bytes = bytes.map_err(self.err("GET (range)", name))?;
                file.write_all_at(&bytes, at).map_err(io("write", path))?;
            }
        }
        Ok(())
    }
}
