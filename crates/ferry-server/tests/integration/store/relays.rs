//! The store's part in relays, on both backends: relay identities and the subtree below each,
//! and partial aggregates counted for every contributor or for none.

use ferry_server::store::{Enrolled, IdentityKind, PartialAcceptance, RunRow, Store};

use super::backends::{Backend, on_both_backends};

on_both_backends!(
    relays_enrol_with_relay_tokens_and_own_the_subtree_below_them,
    a_partial_aggregate_counts_every_contributor_or_none,
);

async fn relays_enrol_with_relay_tokens_and_own_the_subtree_below_them(backend: Backend) {
    let store = Store::open(&backend.url()).await.expect("open");
    store
        .add_token_for("relay-a", "ra", IdentityKind::Relay)
        .await
        .expect("relay token");
    store
        .add_token_for("relay-b", "rb", IdentityKind::Relay)
        .await
        .expect("relay token");
    for (token, name) in [("t1", "site-1"), ("t2", "site-2"), ("t3", "site-3")] {
        store.add_token(name, token).await.expect("node token");
    }
    assert_eq!(
        store.fleet_capacity().await.expect("capacity"),
        (0, 3),
        "relays are not nodes a round can train on"
    );
    let enrolled = store
        .enrol_under("ra", "A", "sa", None)
        .await
        .expect("enrol");
    assert_eq!(
        enrolled,
        Some(Enrolled {
            node_id: "A".into(),
            name: "relay-a".into(),
            kind: IdentityKind::Relay
        })
    );
    // A retry with the same secret hash gets relay A again; another hash gets nothing.
    let again = store
        .enrol_under("ra", "A2", "sa", None)
        .await
        .expect("retry");
    assert_eq!(again.map(|e| e.node_id), Some("A".to_string()));
    assert_eq!(
        store
            .enrol_under("ra", "A3", "sx", None)
            .await
            .expect("guess"),
        None
    );
    // relay-b below relay-a (a chain), a node below each, and one node of its own.
    store
        .enrol_under("rb", "B", "sb", Some("A"))
        .await
        .expect("enrol");
    store
        .enrol_under("t1", "n1", "s1", Some("A"))
        .await
        .expect("enrol");
    store
        .enrol_under("t2", "n2", "s2", Some("B"))
        .await
        .expect("enrol");
    store
        .enrol_under("t3", "n3", "s3", None)
        .await
        .expect("enrol");
    let ids = |rows: Vec<ferry_server::store::NodeRow>| {
        rows.into_iter().map(|r| r.node_id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(store.subtree("A").await.expect("subtree")),
        ["B", "n1", "n2"]
    );
    assert_eq!(ids(store.subtree("B").await.expect("subtree")), ["n2"]);
    assert!(store.subtree("n3").await.expect("subtree").is_empty());
    let n2 = store.node("n2").await.expect("row").expect("node");
    assert_eq!(
        (n2.kind, n2.relay.as_deref()),
        (IdentityKind::Node, Some("B"))
    );
    // A node that fails over to another relay moves into its subtree.
    store.move_node("n3", Some("B")).await.expect("move");
    assert_eq!(
        ids(store.subtree("B").await.expect("subtree")),
        ["n2", "n3"]
    );
    store.move_node("n3", None).await.expect("move back");
    assert_eq!(ids(store.subtree("B").await.expect("subtree")), ["n2"]);
    // Revoking a relay's token revokes the relay.
    assert!(store.revoke("relay-b").await.expect("revoke"));
    assert!(store.node("B").await.expect("row").expect("relay").revoked);
    assert_eq!(store.fleet_capacity().await.expect("capacity"), (3, 0));
}

async fn a_partial_aggregate_counts_every_contributor_or_none(backend: Backend) {
    let store = Store::open(&backend.url()).await.expect("open");
    store
        .start_run(&RunRow {
            run_id: "r".into(),
            config_hash: "c".into(),
            round: 1,
            model_sha: "m0".into(),
            state_sha: String::new(),
            finished: String::new(),
        })
        .await
        .expect("start");
    store.accept(1, "direct", "u").await.expect("accept");
    let pair = ["a".to_string(), "b".to_string()];
    assert_eq!(
        store.accept_partial(1, &pair, "p").await.expect("partial"),
        PartialAcceptance::Accepted
    );
    assert_eq!(
        store.accept_partial(1, &pair, "p").await.expect("again"),
        PartialAcceptance::Duplicate,
        "a partial sent twice counts once"
    );
    let overlapping = ["a".to_string(), "direct".to_string(), "d".to_string()];
    assert_eq!(
        store
            .accept_partial(1, &overlapping, "q")
            .await
            .expect("overlap"),
        PartialAcceptance::CountedElsewhere(vec!["a".into(), "direct".into()])
    );
    assert_eq!(
        store
            .accept_partial(2, &["e".to_string()], "r")
            .await
            .expect("closed"),
        PartialAcceptance::RoundClosed
    );
    let counted = store.accepted(1).await.expect("accepted");
    assert_eq!(
        counted,
        [
            ("a".to_string(), "p".to_string()),
            ("b".into(), "p".into()),
            ("direct".into(), "u".into())
        ],
        "nothing of the refused partials counts"
    );
    // A subtree larger than one statement's rows counts whole.
    let many: Vec<String> = (0..700).map(|i| format!("n{i:03}")).collect();
    assert_eq!(
        store
            .accept_partial(1, &many, "big")
            .await
            .expect("partial"),
        PartialAcceptance::Accepted
    );
    assert_eq!(store.accepted(1).await.expect("accepted").len(), 703);
    store.unaccept_partial(1, "big").await.expect("take back");
    assert_eq!(store.accepted(1).await.expect("accepted").len(), 3);
}
