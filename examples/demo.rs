//! Local three-site demo: three nats-servers and three nodes on 127.0.0.1, partners of
//! each other, on the embedded store. An application on site A publishes resource changes;
//! the demo shows them arriving on sites B and C, then one from B arriving on A and C.
//!
//! Run with `./scripts/demo.sh` (builds, installs nats-server if needed).

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use oc_testkit::{NatsServer, NodeProcess};
use serde_json::json;

struct Site {
    name: &'static str,
    _nats: NatsServer,
    node: NodeProcess,
    app: async_nats::Client,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = oc_testkit::node_binary()?;

    let mut sites = Vec::new();
    for name in ["site-a", "site-b", "site-c"] {
        let nats = NatsServer::start()?;
        let node = NodeProcess::new(&bin, &nats.url())?;
        let app = async_nats::connect(nats.url()).await?;
        sites.push(Site {
            name,
            _nats: nats,
            node,
            app,
        });
    }
    let addrs: Vec<String> = sites.iter().map(|s| s.node.addr()).collect();
    for (i, site) in sites.iter_mut().enumerate() {
        site.node.partners = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| a.clone())
            .collect();
    }
    for site in &mut sites {
        site.node.start_healthy().await?;
        println!(
            "{}: node {} — NATS {} — admin {} — log {}",
            site.name,
            site.node.peer_id,
            site.node.nats_url,
            site.node.admin_url(),
            site.node.log_path().display()
        );
    }

    // Every site's application listens to what its node publishes.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    for site in &sites {
        for subject in ["CREATE_RESOURCE", "REMOVE_RESOURCE"] {
            let mut sub = site.app.subscribe(subject).await?;
            let (tx, name) = (tx.clone(), site.name);
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let _ = tx
                        .send((
                            name,
                            m.subject.to_string(),
                            String::from_utf8_lossy(&m.payload).into_owned(),
                        ))
                        .await;
                }
            });
        }
        site.app.flush().await?;
    }

    let a_id = sites[0].node.peer_id.clone();
    let b_id = sites[1].node.peer_id.clone();
    let steps = [
        (
            0,
            json!({"action": "PB_CREATE", "data_type": "COMPUTE_RESOURCE", "user": "alice", "from_app": "demo",
                   "payload": {"id": "gpu-node-1", "creator_id": a_id, "name": "GPU node", "gpus": 4}}),
        ),
        (
            0,
            json!({"action": "PB_UPDATE", "data_type": "COMPUTE_RESOURCE", "user": "alice", "from_app": "demo",
                   "payload": {"id": "gpu-node-1", "creator_id": a_id, "name": "GPU node", "gpus": 8}}),
        ),
        (
            1,
            json!({"action": "PB_CREATE", "data_type": "STORAGE_RESOURCE", "user": "bob", "from_app": "demo",
                   "payload": {"id": "s3-bucket", "creator_id": b_id, "size_gb": 500}}),
        ),
        (
            0,
            json!({"action": "PB_DELETE", "data_type": "COMPUTE_RESOURCE", "user": "alice", "from_app": "demo",
                   "payload": {"id": "gpu-node-1", "creator_id": a_id}}),
        ),
        // Refused: site A is not the creator of this resource.
        (
            0,
            json!({"action": "PB_CREATE", "data_type": "COMPUTE_RESOURCE", "user": "mallory", "from_app": "demo",
                   "payload": {"id": "stolen", "creator_id": b_id}}),
        ),
    ];
    for (site, body) in steps {
        let s = &sites[site];
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            s.app.request("PROPALGATION_EVENT", body.to_string().into()),
        )
        .await
        .context("no reply from the node")??;
        println!(
            "\n{} app → PROPALGATION_EVENT {} {}\n    reply: {}",
            s.name,
            body["action"],
            body["payload"]["id"],
            String::from_utf8_lossy(&reply.payload)
        );
        // Each accepted event reaches the two other sites.
        if String::from_utf8_lossy(&reply.payload).contains("\"ok\":true") {
            for _ in 0..2 {
                let (name, subject, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .context("event did not propagate within 10 s")?
                    .context("collectors stopped")?;
                println!("    {name} app ← {subject} {payload}");
            }
        }
    }

    let (_, peers) = oc_discovery::cli::http_get(&sites[0].node.admin_url(), "/api/peers")?;
    println!("\nsite-a partners (GET /api/peers): {peers}");
    println!("\nDemo complete: every accepted event reached every partner; the refused one was answered with its error code.");
    Ok(())
}
