//! A session whose queries run on a cluster.

use std::time::Duration;

use ballista::prelude::SessionContextExt;
use datafusion::prelude::SessionContext;

use super::parse_host_port;
use super::process::cluster_config;
use crate::error::{BalansError, Result};
use crate::session::{SessionSettings, balans_state, finish_context, runtime_env};

/// How long the client waits for the scheduler to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A session whose queries run on the cluster whose scheduler is at `url`
/// (`df://HOST:PORT`), with Balans's SQL functions, relations and codecs. SQL is planned here
/// (tables are registered in this session as usual); the scheduler plans the physical plan
/// and the executors run it. Fails within seconds, with the address, when the scheduler
/// cannot be reached: a query never falls back to running locally.
pub async fn connect(url: &str, settings: &SessionSettings) -> Result<SessionContext> {
    let address = url.strip_prefix("df://").ok_or_else(|| {
        BalansError::InvalidArgument(format!(
            "--scheduler takes df://HOST:PORT (e.g. df://127.0.0.1:50050), got '{url}'"
        ))
    })?;
    let address = address.trim_end_matches('/');
    let (host, port) = parse_host_port(address, "--scheduler")?;
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(BalansError::Cluster(format!(
                "cannot reach the scheduler at {url}: {e} (is `balans cluster scheduler` \
                 running there?)"
            )));
        }
        Err(_) => {
            return Err(BalansError::Cluster(format!(
                "cannot reach the scheduler at {url}: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )));
        }
    }
    let runtime = runtime_env(settings)?;
    let (state, relations) = balans_state(cluster_config(settings), runtime);
    let ctx = SessionContext::remote_with_state(&format!("df://{host}:{port}"), state).await?;
    // Ballista replaces the session's function lists with its own: register ours again.
    Ok(finish_context(ctx, relations))
}
