//! Partner addresses that name a host (`/dns4/<name>/tcp/<port>/p2p/<id>`), as the README
//! and docker-compose.yml give them, are resolved when dialled.

use oc_testkit::{event, init_tracing, Site};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_named_by_dns_are_dialled() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    let by_name = |s: &Site| format!("/dns4/localhost/tcp/{}/p2p/{}", s.node.p2p_port, s.id());
    a.node.partners.push(by_name(&b));
    b.node.partners.push(by_name(&a));
    let seen_b = b.collect(&["CREATE_RESOURCE"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();
    a.publish_ok(&event("PB_CREATE", "dns-1", &me, json!({"name": "by name"})))
        .await;
    seen_b
        .wait_for("the resource on B", |s| {
            s.iter().any(|m| m.body["resource"]["id"] == "dns-1")
        })
        .await;
    let peers = a.node.get_json("/api/peers").await.unwrap();
    assert_eq!(peers[0]["state"], "online", "{peers}");
}
