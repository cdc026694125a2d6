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
use crate::seal::{self, SealError, SealKey};
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
    /// Epoch objects are encrypted with this key (`--encrypt-key`).
    key: Option<SealKey>,
    /// `AWS_ENDPOINT_URL` (or the profile's), if one was given.
    endpoint: Option<String>,
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
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`; what they leave out comes
    /// from the profile `AWS_PROFILE` names (or `default`) in
    /// `~/.aws/credentials` and `~/.aws/config`. Requests use path-style
    /// addressing (as Garage, MinIO and Ceph expect) and give up after a
    /// few retries, so that a wrong endpoint fails in seconds.
    pub fn from_env(url: &RemoteUrl) -> Result<Client> {
        let setup = |why: String| RemoteError::Setup {
            url: url.to_string(),
            why,
        };
        // The environment first, then the profile for what it leaves out.
        let profile = crate::profile::load();
        let env_or = |var: &str, key: &str| std::env::var(var).ok().or_else(|| profile.get(key).map(str::to_string));
        let endpoint = env_or("AWS_ENDPOINT_URL", "endpoint_url");
        let http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        // HTTPS through rustls with ring's primitives (the process's
        // default provider; already set is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env();
        // Without credentials the S3 client would ask the cloud's instance
        // metadata service (169.254.169.254) for some: an address the user
        // did not name. Refuse instead.
        let has_key = std::env::var_os("AWS_ACCESS_KEY_ID").is_some() || profile.get("aws_access_key_id").is_some();
        if !has_key {
            return Err(setup(
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or aws_access_key_id and \
                 aws_secret_access_key in the profile)"
                    .into(),
            ));
        }
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
            && let (Some(id), Some(secret)) = (profile.get("aws_access_key_id"), profile.get("aws_secret_access_key"))
        {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = profile.get("aws_session_token") {
                builder = builder.with_token(t);
            }
        }
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            && let Some(r) = profile.get("region")
        {
            builder = builder.with_region(r);
        }
        let mut builder = builder
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
        if let Some(e) = &endpoint {
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
            key: None,
            endpoint,
        })
    }

    /// Encrypt epoch objects with `key` (and decrypt them with it).
    pub fn with_key(mut self, key: Option<SealKey>) -> Client {
        self.key = key;
        self
    }

    /// The key epoch objects are encrypted with, if any.
    pub fn key(&self) -> Option<&SealKey> {
        self.key.as_ref()
    }

    fn bad_object(&self, name: &str, why: String) -> RemoteError {
        RemoteError::BadObject {
            url: self.url.to_string(),
            key: self.url.key(name),
            why,
        }
    }

    /// An encrypted object `name` that does not open.
    fn sealed_object(&self, name: &str) -> impl FnOnce(SealError) -> RemoteError + use<> {
        let (url, key) = (self.url.to_string(), self.url.key(name));
        move |source| RemoteError::SealedObject { url, key, source }
    }

    /// The endpoint requests go to, as given (`AWS_ENDPOINT_URL` or the
    /// profile's `endpoint_url`); `None`: the S3 client's default (AWS).
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The store's URL.
    pub fn url(&self) -> &RemoteUrl {
        &self.url
    }

    fn object_key(&self, name: &str) -> Key {
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
        let key = self.object_key(name);
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
        if let Some(k) = &self.key {
            return self.put_sealed(k, name, file, len, path);
        }
        self.put_pieces(name, len, &[], len.div_ceil(PART as u64), |i, buf| {
            let at = i * PART as u64;
            buf.resize((len - at).min(PART as u64) as usize, 0);
            file.read_exact_at(buf, at).map_err(io("read", path))
        })
    }

    /// [`Client::put_file`], encrypted: the head, then each 1 MiB chunk sealed.
    fn put_sealed(&self, k: &SealKey, name: &str, file: &File, len: u64, path: &std::path::Path) -> Result<()> {
        let head = k.head(len).map_err(|source| RemoteError::Nonce {
            url: self.url.to_string(),
            source,
        })?;
        let n = seal::chunks(len);
        self.put_pieces(name, seal::sealed_len(len), &head, n, |i, buf| {
            let at = i * seal::CHUNK as u64;
            buf.resize((len - at).min(seal::CHUNK as u64) as usize, 0);
            file.read_exact_at(buf, at).map_err(io("read", path))?;
            k.seal_chunk(&head, name, i, i + 1 == n, buf);
            Ok(())
        })
    }

    /// Put object `name` of `total` bytes: `head`, then `pieces` pieces
    /// that `fill(i, buf)` puts into `buf` in turn. In one request up to
    /// 16 MiB, in parts (4 in flight) above; a failed piece aborts the
    /// upload.
    fn put_pieces(
        &self,
        name: &str,
        total: u64,
        head: &[u8],
        pieces: u64,
        mut fill: impl FnMut(u64, &mut Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut buf = Vec::new();
        if total <= MULTIPART_FROM {
            let mut all = Vec::with_capacity(total as usize);
            all.extend_from_slice(head);
            for i in 0..pieces {
                fill(i, &mut buf)?;
                all.extend_from_slice(&buf);
            }
            return self.put(name, all);
        }
        let key = self.object_key(name);
        self.rt.block_on(async {
            let upload = self
                .store
                .put_multipart(&key)
                .await
                .map_err(self.err("start multipart upload of", name))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            w.write(head);
            for i in 0..pieces {
                if let Err(e) = fill(i, &mut buf) {
                    let _ = w.abort().await;
                    return Err(e);
                }
                w.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(self.err("upload a part of", name))?;
                w.write(&buf);
            }
            w.finish()
                .await
                .map(drop)
                .map_err(self.err("finish multipart upload of", name))
        })
    }

    /// The first `want` plaintext bytes of epoch object `name` of `len`
    /// plaintext bytes (decrypted and authenticated when encrypted).
    pub fn get_start(&self, name: &str, len: u64, want: u64) -> Result<Vec<u8>> {
        let Some(k) = &self.key else {
            return self.get_range(name, 0..want.min(len));
        };
        let first = seal::chunk_range(len, 0);
        let mut b = self.get_range(name, 0..first.end)?;
        if b.len() < seal::HEAD {
            return Err(self.bad_object(name, "cut short".into()));
        }
        let head: Vec<u8> = b[..seal::HEAD].to_vec();
        if k.open_head(&head).map_err(self.sealed_object(name))? != len {
            return Err(self.bad_object(name, "its length is not the manifest's".into()));
        }
        let sealed = &mut b[seal::HEAD..];
        k.open_chunk(&head, name, 0, seal::chunks(len) == 1, sealed)
            .map_err(self.sealed_object(name))?;
        let plain = sealed.len() - seal::TAG_LEN;
        Ok(sealed[..plain.min(want as usize)].to_vec())
    }

    /// Object `name`, or `None` if there is none.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let key = self.object_key(name);
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
        let key = self.object_key(name);
        self.rt
            .block_on(self.store.get_range(&key, range))
            .map(|b| b.to_vec())
            .map_err(self.err("GET (range)", name))
    }

    /// Objects directly under `dir` (relative to the prefix): (name
    /// relative to the prefix, size).
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let key = self.object_key(dir);
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
        let key = self.object_key(name);
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
        if let Some(k) = &self.key {
            return self.get_sealed(k, name, len, file, path, parallel);
        }
        let ranges: Vec<Range<u64>> = (0..len.div_ceil(PART as u64))
            .map(|i| i * PART as u64..((i + 1) * PART as u64).min(len))
            .collect();
        self.get_ranges(name, &ranges, parallel, |i, bytes| {
            file.write_all_at(&bytes, ranges[i].start).map_err(io("write", path))
        })
    }

    /// [`Client::get_to_file`] for an encrypted object: its head, then
    /// groups of 8 sealed chunks with parallel ranged GETs, each chunk
    /// authenticated before its plaintext is written.
    fn get_sealed(
        &self,
        k: &SealKey,
        name: &str,
        len: u64,
        file: &File,
        path: &std::path::Path,
        parallel: usize,
    ) -> Result<()> {
        let head = self.get_range(name, 0..seal::HEAD as u64)?;
        if k.open_head(&head).map_err(self.sealed_object(name))? != len {
            return Err(self.bad_object(name, "its length is not the manifest's".into()));
        }
        let n = seal::chunks(len);
        let groups: Vec<u64> = (0..n).step_by(8).collect();
        let ranges: Vec<Range<u64>> = groups
            .iter()
            .map(|&g| seal::chunk_range(len, g).start..seal::chunk_range(len, (g + 8).min(n) - 1).end)
            .collect();
        self.get_ranges(name, &ranges, parallel, |gi, mut bytes| {
            let opened = k
                .open_chunks(&head, name, len, groups[gi], &mut bytes)
                .map_err(self.sealed_object(name))?;
            for (i, plain) in opened {
                file.write_all_at(&bytes[plain], i * seal::CHUNK as u64)
                    .map_err(io("write", path))?;
            }
            Ok(())
        })
    }

    /// GET `ranges` of object `name`, up to `parallel` at once, handing
    /// each one's bytes to `each(index in ranges, bytes)` as it arrives.
    fn get_ranges(
        &self,
        name: &str,
        ranges: &[Range<u64>],
        parallel: usize,
        mut each: impl FnMut(usize, Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let key = self.object_key(name);
        let batch = parallel.max(1);
        for (b, group) in ranges.chunks(batch).enumerate() {
            let parts = self.rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for (k, r) in group.iter().enumerate() {
                    let (store, key, r) = (self.store.clone(), key.clone(), r.clone());
                    set.spawn(async move { (b * batch + k, store.get_range(&key, r).await) });
                }
                let mut out = Vec::new();
                while let Some(j) = set.join_next().await {
                    out.push(j);
                }
                out
            });
            for p in parts {
                let (i, bytes) = p.map_err(|e| RemoteError::Setup {
                    url: self.url.to_string(),
                    why: format!("a download task failed: {e}"),
                })?;
                // Without a copy when the buffer is not shared.
                each(i, Vec::from(bytes.map_err(self.err("GET (range)", name))?))?;
            }
        }
        Ok(())
    }
}
