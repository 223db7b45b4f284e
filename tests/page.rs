//! The web page at `/` in headless Chromium through WebDriver (Debian's `chromium` and
//! `chromium-driver`; the test fails with the install command without them), against two
//! real nodes: the token asked once, the first portion, scrolling back to "oldest reached",
//! pause (a new entry not shown), resume (the newest portion, live again), a filter, the
//! partner's applied tab and an origin filter, the token not asked again, a partner going
//! offline in the partners table, phone width. Screenshots go to target/screenshots/.

use std::path::PathBuf;

use fantoccini::Locator;
use oc_testkit::*;
use serde_json::{json, Value};

const TOKEN: &str = "page-test-token";

fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

/// The keys of the feed's rows, top first.
async fn keys(b: &Browser) -> Vec<u64> {
    let v = b
        .js(
            "return [...document.querySelectorAll('#rows tr.entry')].map(r => Number(r.dataset.key));",
            vec![],
        )
        .await
        .expect("rows");
    serde_json::from_value(v).expect("numbers")
}

async fn text_of(b: &Browser, css: &str) -> String {
    let v = b
        .js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![json!(css)],
        )
        .await
        .expect("text");
    v.as_str().unwrap_or_default().to_owned()
}

async fn click(b: &Browser, at: Locator<'_>) {
    b.client
        .find(at)
        .await
        .expect("element")
        .click()
        .await
        .expect("click");
}

async fn wait_for(b: &Browser, what: &str, check: impl AsyncFn(&Browser) -> bool) {
    eventually(what, async || check(b).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_the_feed_pages_back_pauses_resumes_filters_and_shows_partners() {
    init_tracing();
    let mut a = Site::new().await;
    let mut b = Site::new().await;
    partner(&mut a, &mut [&mut b]);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    a.node.extra_args = vec!["--admin-token-file".into(), token_file.display().to_string()];
    a.node.admin_token = Some(TOKEN.into());
    a.node.start_healthy().await.unwrap();
    b.node.start_healthy().await.unwrap();
    let me = a.id();
    // 120 entries, every tenth a STORAGE_RESOURCE.
    for i in 1..=120 {
        let mut body = event(
            "PB_CREATE",
            &format!("res-{i:03}"),
            &me,
            json!({"name": format!("resource {i}")}),
        );
        if i % 10 == 0 {
            body["data_type"] = json!("STORAGE_RESOURCE");
        }
        a.publish_ok(&body).await;
    }

    let browser = Browser::start(1280, 900).await.expect("headless chromium");
    browser.client.goto(&a.node.admin_url()).await.unwrap();

    // The token, asked once.
    let input = browser
        .client
        .wait()
        .for_element(Locator::Css("#login-token"))
        .await
        .unwrap();
    wait_for(&browser, "the token dialog", async |b| {
        b.js("return document.getElementById('login').open;", vec![])
            .await
            .ok()
            == Some(json!(true))
    })
    .await;
    input.send_keys(TOKEN).await.unwrap();
    click(&browser, Locator::Css("#login-form button[type=submit]")).await;
    let kept = browser
        .js(
            "return sessionStorage.getItem('oc-discovery.admin-token');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept, json!(TOKEN));

    // The first portion: the newest 50, newest on top, live.
    wait_for(&browser, "the first portion", async |b| {
        keys(b).await.first() == Some(&120)
    })
    .await;
    let first = keys(&browser).await;
    assert_eq!(first, (71..=120).rev().collect::<Vec<_>>());
    assert_eq!(text_of(&browser, "#state").await, "live");
    assert_eq!(
        text_of(&browser, "#peer-rows tr[data-peer] td.state").await,
        "online"
    );

    // Scrolling down: older pages until "oldest reached"; scrolling away from the top paused.
    wait_for(&browser, "the oldest entry after scrolling", async |b| {
        let _ = b
            .js(
                "const f = document.getElementById('feed'); f.scrollTop = f.scrollHeight;",
                vec![],
            )
            .await;
        text_of(b, "#end").await == "oldest reached"
    })
    .await;
    assert_eq!(keys(&browser).await, (1..=120).rev().collect::<Vec<_>>());
    assert_eq!(text_of(&browser, "#state").await, "paused");
    browser
        .screenshot(&screenshot_dir().join("feed-oldest.png"))
        .await
        .unwrap();

    // Paused: a new entry is committed and sent to a live client, not to the page.
    let mut watcher = FeedClient::connect(&a.node).await.unwrap();
    watcher
        .subscribe(json!({"type": "subscribe", "feed": "journal", "portion": 1}))
        .await
        .unwrap();
    a.publish_ok(&event("PB_UPDATE", "res-001", &me, json!({"name": "renamed"})))
        .await;
    assert_eq!(watcher.expect("live").await.unwrap()["entry"]["seq"], 121);
    assert!(
        !keys(&browser).await.contains(&121),
        "a paused page shows no live row"
    );

    // Resume: the newest portion again (121 on top), then live rows again.
    click(&browser, Locator::Id("resume")).await;
    wait_for(&browser, "the newest portion after resume", async |b| {
        keys(b).await == (72..=121).rev().collect::<Vec<_>>()
    })
    .await;
    assert_eq!(text_of(&browser, "#state").await, "live");
    a.publish_ok(&event("PB_DELETE", "res-002", &me, json!({}))).await;
    wait_for(&browser, "a live row on top", async |b| {
        keys(b).await.first() == Some(&122)
    })
    .await;
    assert_eq!(text_of(&browser, "#rows tr.entry td.action").await, "delete");

    // A filter by data type.
    let filter = browser.client.find(Locator::Id("filter-type")).await.unwrap();
    filter.send_keys("STORAGE_RESOURCE").await.unwrap();
    click(&browser, Locator::Css("#filters button[type=submit]")).await;
    wait_for(&browser, "the filtered page", async |b| {
        keys(b).await == (1..=12).rev().map(|i| i * 10).collect::<Vec<_>>()
    })
    .await;
    let types: Value = browser
        .js(
            "return [...document.querySelectorAll('#rows td.type')].map(t => t.textContent);",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        types.as_array().unwrap().iter().all(|t| t == "STORAGE_RESOURCE"),
        "{types}"
    );
    assert_eq!(text_of(&browser, "#end").await, "oldest reached");
    filter.clear().await.unwrap();
    click(&browser, Locator::Css("#filters button[type=submit]")).await;
    wait_for(&browser, "the unfiltered page", async |b| {
        keys(b).await.first() == Some(&122)
    })
    .await;

    // The partner's page (no token there): the applied tab, by origin.
    browser.client.goto(&b.node.admin_url()).await.unwrap();
    wait_for(&browser, "the partner's journal tab", async |b| {
        text_of(b, "#state").await == "live"
    })
    .await;
    click(&browser, Locator::Id("tab-applied")).await;
    wait_for(&browser, "the applied tab", async |b| {
        keys(b).await.first() == Some(&122)
    })
    .await;
    let origin: Value = browser
        .js("return document.querySelector('#rows td.origin').title;", vec![])
        .await
        .unwrap();
    assert_eq!(origin, json!(me));
    let by_origin = browser.client.find(Locator::Id("filter-origin")).await.unwrap();
    by_origin.send_keys("12D3KooWNobody").await.unwrap();
    click(&browser, Locator::Css("#filters button[type=submit]")).await;
    wait_for(&browser, "nothing from another origin", async |b| {
        keys(b).await.is_empty() && text_of(b, "#end").await == "oldest reached"
    })
    .await;

    // Back on this node's page: the token is still in the tab, not asked again.
    browser.client.goto(&a.node.admin_url()).await.unwrap();
    wait_for(&browser, "the page without a second token prompt", async |b| {
        keys(b).await.first() == Some(&122)
    })
    .await;
    let asked: Value = browser
        .js("return document.getElementById('login').open;", vec![])
        .await
        .unwrap();
    assert_eq!(asked, json!(false), "the token is asked once");

    // The partner goes offline: the partners table shows it.
    b.node.stop();
    wait_for(&browser, "the partner offline", async |b| {
        text_of(b, "#peer-rows tr[data-peer] td.state").await == "offline"
    })
    .await;
    browser
        .screenshot(&screenshot_dir().join("feed.png"))
        .await
        .unwrap();

    // Phone width: the same page, one column.
    browser.client.set_window_size(390, 844).await.unwrap();
    browser
        .screenshot(&screenshot_dir().join("feed-phone.png"))
        .await
        .unwrap();
    let width: Value = browser
        .js(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        width[0].as_f64() <= width[1].as_f64(),
        "no horizontal scrolling at phone width: {width}"
    );
    browser.close().await;
}
