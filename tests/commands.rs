//! PB_CONSIDERS and planner messages to chosen peers.

use oc_testkit::{init_tracing, partner, Site, WAIT};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn considers_reach_each_listed_peer_and_unreachable_ones_are_named() {
    init_tracing();
    let (mut a, mut b, mut c) = (Site::new().await, Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b, &mut c]);
    let seen_b = b.collect(&["PROPALGATION_EVENT"]).await;
    let seen_c = c.collect(&["PROPALGATION_EVENT"]).await;
    let errors_a = a.collect(&["PROPALGATION_ERROR"]).await;
    for s in [&mut a, &mut b, &mut c] {
        s.node.start_healthy().await.unwrap();
    }
    let ghost = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let body = json!({"action": "PB_CONSIDERS", "data_type": "WORKFLOW_EXECUTION", "user": "alice",
                      "payload": {"peer_ids": [b.id(), c.id(), ghost], "execution_id": "exec-1"}});
    let reply = a.request(&body).await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "unreachable");
    assert_eq!(reply["unreachable"][0]["peer_id"], ghost.as_str(), "{reply}");
    assert_eq!(reply["delivered"].as_array().unwrap().len(), 2, "{reply}");
    for seen in [&seen_b, &seen_c] {
        seen.wait_for("the considers event", |s| {
            s.iter().any(|m| m.body["action"] == "PB_CONSIDERS")
        })
        .await;
        let m = seen
            .all()
            .into_iter()
            .find(|m| m.body["action"] == "PB_CONSIDERS")
            .unwrap();
        assert_eq!(m.body["from_app"], "oc-discovery");
        assert_eq!(m.body["from_peer"], a.id().as_str());
        assert_eq!(m.body["payload"]["execution_id"], "exec-1");
        assert_eq!(m.body["data_type"], "WORKFLOW_EXECUTION");
    }
    errors_a
        .wait_for("the unreachable error event", |s| !s.is_empty())
        .await;
    let err = &errors_a.all()[0].body;
    assert_eq!(err["error"]["code"], "unreachable");
    assert!(err["error"]["message"].as_str().unwrap().contains(&ghost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planner_messages_share_one_stream_until_closed() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    let seen_b = b.collect(&["PROPALGATION_EVENT"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    for step in 0..3 {
        let body = json!({"action": "PB_PLANNER", "data_type": "BOOKING", "user": "alice",
                          "payload": {"peer_id": b.id(), "step": step}});
        let reply = a.request(&body).await;
        assert_eq!(reply["ok"], true, "{reply}");
    }
    seen_b.wait_for("three planner messages", |s| s.len() >= 3).await;
    let steps: Vec<Value> = seen_b
        .all()
        .iter()
        .map(|m| m.body["payload"]["step"].clone())
        .collect();
    assert_eq!(steps, vec![json!(0), json!(1), json!(2)], "in order");
    assert!(seen_b
        .all()
        .iter()
        .all(|m| m.body["action"] == "PB_PLANNER" && m.body["from_app"] == "oc-discovery"));
    let reply = a
        .request(
            &json!({"action": "PB_CLOSE_PLANNER", "data_type": "BOOKING", "payload": {"peer_id": b.id()}}),
        )
        .await;
    assert_eq!(reply, json!({"ok": true, "peer_id": b.id(), "closed": true}));
    let reply = a
        .request(
            &json!({"action": "PB_CLOSE_PLANNER", "data_type": "BOOKING", "payload": {"peer_id": "nope"}}),
        )
        .await;
    assert_eq!(reply["error"]["code"], "invalid_field", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_planner_stream_is_forgotten_and_the_next_message_opens_a_new_one() {
    init_tracing();
    let (mut a, mut b) = (Site::new().await, Site::new().await);
    partner(&mut a, &mut [&mut b]);
    a.node
        .extra_args
        .extend(["--planner-idle", "1s"].map(String::from));
    let seen_b = b.collect(&["PROPALGATION_EVENT"]).await;
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let planner = |step: u32| {
        json!({"action": "PB_PLANNER", "data_type": "BOOKING", "user": "alice",
               "payload": {"peer_id": b.id(), "step": step}})
    };
    assert_eq!(a.request(&planner(0)).await["ok"], true);
    seen_b
        .wait_for("the first planner message", |s| s.len() == 1)
        .await;
    oc_testkit::wait_until("the idle planner stream closed", WAIT, || {
        a.node.log().contains("idle planner stream closed")
    })
    .await
    .unwrap();
    // Its queue is forgotten: nothing left to close.
    let reply = a
        .request(
            &json!({"action": "PB_CLOSE_PLANNER", "data_type": "BOOKING", "payload": {"peer_id": b.id()}}),
        )
        .await;
    assert_eq!(reply, json!({"ok": true, "peer_id": b.id(), "closed": false}));
    assert_eq!(a.request(&planner(1)).await["ok"], true);
    seen_b
        .wait_for("the second planner message", |s| s.len() == 2)
        .await;
    assert_eq!(seen_b.all()[1].body["payload"]["step"], 1);
}
