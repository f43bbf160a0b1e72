//! Fair scheduling on one VM: CPU-bound handlers never starve or fail the
//! handlers beside them.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// One VM, `heavy` spins until its deadline, `quick` sleeps 50 ms and replies.
const MIX: &str = r#"
bus.subscribe("mix.heavy", { kind = "heavy", timeout = "300ms" })
bus.subscribe("mix.quick", { kind = "quick", timeout = "500ms" })
bus.on("heavy", function(ev) while true do end end)
bus.on("quick", function(ev)
  time.sleep("50ms")
  return "quick " .. ev.data
end)
"#;

#[tokio::test]
async fn quick_handlers_are_answered_beside_cpu_bound_ones() {
    let app = start_app(MIX, &[]).await;
    let mut worst = Duration::ZERO;
    for round in 0..6 {
        let mut quick = Vec::new();
        for i in 0..5 {
            let client = app.client.clone();
            quick.push(tokio::spawn(async move {
                let sent = Instant::now();
                let reply = request(&client, "mix.quick", &format!("{round}-{i}")).await;
                (reply, sent.elapsed())
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut heavy = Vec::new();
        for _ in 0..4 {
            let client = app.client.clone();
            heavy.push(tokio::spawn(async move { request(&client, "mix.heavy", "").await }));
        }
        for (i, task) in quick.into_iter().enumerate() {
            let (reply, took) = task.await.unwrap();
            assert_eq!(error_of(&reply), None, "round {round} quick {i}");
            assert_eq!(body(&reply), format!("quick {round}-{i}"));
            worst = worst.max(took);
        }
        for task in heavy {
            let reply = task.await.unwrap();
            let (code, message) = error_of(&reply).expect("heavy handlers time out");
            assert_eq!((code, message.as_str()), (504, "handler timed out after 300ms"));
        }
    }
    eprintln!("slowest quick reply: {worst:?}");
}
