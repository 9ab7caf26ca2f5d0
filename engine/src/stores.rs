//! The session's object-store registry: `s3://bucket` and `http(s)://host` stores are created
//! on first use (for
//! `CREATE EXTERNAL TABLE ... LOCATION 's3://...'` and `COPY ... TO 's3://...'` in SQL) with
//! the same settings as `--input s3://...` (endpoint, unsigned public access, short timeouts).

use std::sync::Arc;

use datafusion::common::{Result, exec_datafusion_err};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use object_store::ObjectStore;
use url::Url;

use crate::source::{SourceOptions, http_store, s3_store};

/// [`DefaultObjectStoreRegistry`] plus S3 stores made on demand.
#[derive(Debug)]
pub struct BalansObjectStoreRegistry {
    inner: DefaultObjectStoreRegistry,
    options: SourceOptions,
}

impl BalansObjectStoreRegistry {
    /// A registry with the local file system and on-demand S3 stores built with `options`.
    pub fn new(options: SourceOptions) -> Self {
        Self {
            inner: DefaultObjectStoreRegistry::new(),
            options,
        }
    }
}

impl ObjectStoreRegistry for BalansObjectStoreRegistry {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.inner.get_store(url) {
            return Ok(store);
        }
        match url.scheme() {
            "s3" | "s3a" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| exec_datafusion_err!("'{url}' names no bucket"))?;
                let store = s3_store(bucket, &self.options)
                    .map_err(|e| exec_datafusion_err!("cannot open s3://{bucket}: {e}"))?;
                self.inner.register_store(url, Arc::clone(&store));
                Ok(store)
            }
            "http" | "https" => {
                let store = http_store(url, &self.options)
                    .map_err(|e| exec_datafusion_err!("cannot open {url}: {e}"))?;
                self.inner.register_store(url, Arc::clone(&store));
                Ok(store)
            }
            _ => self.inner.get_store(url),
        }
    }
}
