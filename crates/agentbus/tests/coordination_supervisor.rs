//! The supervisor: assignment and tracking, NoAgentFound, escalation (retry → backup →
//! dead letter + channel.system.timeout), circuit breakers, redistribution of a dead
//! agent's tasks, selection through real workers, broadcasts and statistics.

mod coordination_common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::coordination::{
    BreakerConfig, BreakerState, CoordinationMessage, Strategy, Supervisor, SupervisorOptions,
    Target, TaskError, TaskEvent, TaskSpec, TaskStatus, TimeoutNotice, Worker,
    COORDINATION_BROADCAST, SYSTEM_TIMEOUT, TASKS_ESCALATED, TASK_EVENTS,
};
use agentbus::{
    AgentDescriptor, Bus, ChannelPattern, DeadLetterFilter, DeadReason, ErrorKind, SubscribeOptions,
};
use coordination_common::{advance, eventually, manual_bus, within};
use parking_lot::Mutex;
use serde_json::json;

async fn echo_worker(bus: &Bus, id: &str, capability: &str, heartbeat: Duration) -> Worker {
    let me = id.to_string();
    Worker::builder(AgentDescriptor::new(id, capability).capability(capability))
        .heartbeat(heartbeat)
        .concurrency(4)
        .handle(move |task| {
            let me = me.clone();
            async move { Ok(json!({ "by": me, "input": task.input })) }
        })
        .spawn(bus)
        .await
        .unwrap()
}

async fn hanging_worker(
    bus: &Bus,
    id: &str,
    capability: &str,
    heartbeat: Duration,
) -> (Worker, Arc<AtomicU32>) {
    let started = Arc::new(AtomicU32::new(0));
    let count = started.clone();
    let worker = Worker::builder(AgentDescriptor::new(id, capability).capability(capability))
        .heartbeat(heartbeat)
        .concurrency(4)
        .handle(move |_task| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                futures::future::pending::<()>().await;
                Ok(json!(null))
            }
        })
        .spawn(bus)
        .await
        .unwrap();
    (worker, started)
}

async fn supervisor(bus: &Bus, options: SupervisorOptions) -> Supervisor {
    Supervisor::start(bus, options).await.unwrap()
}

#[tokio::test]
async fn a_task_is_tracked_from_pending_to_completed_with_history_events_and_stats() {
    let bus = Bus::memory();
    let mut events = bus
        .subscribe_typed::<TaskEvent>(SubscribeOptions::new(
            ChannelPattern::new(TASK_EVENTS).unwrap(),
        ))
        .await
        .unwrap();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let worker = echo_worker(&bus, "echo-1", "echo", Duration::from_secs(1)).await;
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;

    let handle = sup
        .submit(
            TaskSpec::capability("echo")
                .input(json!({"n": 1}))
                .id("t-1"),
        )
        .await
        .unwrap();
    assert_eq!(handle.id(), "t-1");
    let outcome = within("task", handle.wait()).await;
    assert_eq!(outcome.status, TaskStatus::Completed);
    assert_eq!(outcome.agent.as_deref(), Some("echo-1"));
    assert_eq!(outcome.output.unwrap()["input"]["n"], 1);

    let record = sup.task("t-1").unwrap();
    let statuses: Vec<TaskStatus> = record.history.iter().map(|e| e.status).collect();
    assert_eq!(
        statuses,
        [
            TaskStatus::Pending,
            TaskStatus::Assigned,
            TaskStatus::Running,
            TaskStatus::Completed
        ]
    );
    assert!(record.finished_at.is_some());
    // The same history on `_sys.tasks.events`.
    let mut on_bus = Vec::new();
    while on_bus.len() < 4 {
        let e = within("task event", events.next()).await.unwrap();
        e.delivery.ack().await.unwrap();
        on_bus.push(e.message.status);
    }
    assert_eq!(on_bus, statuses);

    for n in 0..9 {
        sup.submit(TaskSpec::capability("echo").input(json!(n)))
            .await
            .unwrap()
            .wait()
            .await;
    }
    let stats = sup.agent_stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].agent_id, "echo-1");
    assert_eq!(stats[0].completed, 10);
    assert_eq!(stats[0].success_rate, 1.0);
    assert!(
        stats[0].latency_p50_ms.is_some() && stats[0].latency_p99_ms >= stats[0].latency_p50_ms
    );
    assert_eq!(sup.stats().completed, 10);
    assert_eq!(sup.tasks().len(), 10);
    worker.stop(Duration::from_secs(1)).await;
    sup.shutdown();
}

#[tokio::test]
async fn no_agent_found_names_the_capability_and_lists_what_exists() {
    let bus = Bus::memory();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let worker = echo_worker(&bus, "echo-1", "echo", Duration::from_secs(1)).await;
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    let error = sup
        .submit(TaskSpec::capability("translate"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoAgentFound);
    let text = error.to_string();
    assert!(text.contains("capability 'translate'"), "{text}");
    assert!(text.contains("capabilities available: echo"), "{text}");
    let error = sup.submit(TaskSpec::agent("ghost")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoAgentFound);
    assert!(
        error.to_string().contains("known agents: echo-1"),
        "{error}"
    );
    worker.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn timeouts_retry_the_same_agent_then_the_backup_then_escalate() {
    let (bus, clock) = manual_bus();
    let mut notices = bus
        .subscribe_typed::<TimeoutNotice>(SubscribeOptions::new(
            ChannelPattern::new(SYSTEM_TIMEOUT).unwrap(),
        ))
        .await
        .unwrap();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    // Long heartbeats: the clock jumps must not make anyone unhealthy here.
    let hb = Duration::from_secs(600);
    let (_primary, primary_runs) = hanging_worker(&bus, "sched-1", "scheduling", hb).await;
    let (_backup, backup_runs) = hanging_worker(&bus, "backup-1", "scheduling-backup", hb).await;
    within("agents", sup.registry().wait_for(|a| a.len() == 2)).await;

    let timeout = Duration::from_secs(5);
    let handle = sup
        .submit(
            TaskSpec::capability("scheduling")
                .input(json!({"vehicle": "v-7"}))
                .timeout(timeout)
                .retries(1)
                .backup(Target::Capability("scheduling-backup".into()))
                .id("sched-task"),
        )
        .await
        .unwrap();
    eventually("first attempt running", || {
        primary_runs.load(Ordering::SeqCst) == 1
    })
    .await;
    clock.advance(timeout);
    sup.check_timeouts().await;
    eventually("retried on the same agent", || {
        primary_runs.load(Ordering::SeqCst) == 2
    })
    .await;
    clock.advance(timeout);
    sup.check_timeouts().await;
    eventually("sent to the backup", || {
        backup_runs.load(Ordering::SeqCst) == 1
    })
    .await;
    clock.advance(timeout);
    sup.check_timeouts().await;
    let outcome = within("escalated", handle.wait()).await;
    assert_eq!(outcome.status, TaskStatus::Escalated);
    assert_eq!(outcome.attempts, 3);

    let record = sup.task("sched-task").unwrap();
    assert_eq!(record.agents_tried, ["sched-1", "sched-1", "backup-1"]);
    // `running` reports race with the clock jumps, so they are left out here.
    let statuses: Vec<TaskStatus> = record
        .history
        .iter()
        .map(|e| e.status)
        .filter(|s| *s != TaskStatus::Running)
        .collect();
    assert_eq!(
        statuses,
        [
            TaskStatus::Pending,
            TaskStatus::Assigned,
            TaskStatus::TimedOut,
            TaskStatus::Assigned,
            TaskStatus::TimedOut,
            TaskStatus::Assigned,
            TaskStatus::TimedOut,
            TaskStatus::Escalated
        ]
    );
    assert_eq!(statuses.last(), Some(&TaskStatus::Escalated));

    // The operator's notice.
    let notice = within("notice", notices.next()).await.unwrap();
    assert_eq!(notice.message.task_id, "sched-task");
    assert_eq!(notice.message.attempts, 3);
    assert_eq!(notice.message.input["vehicle"], "v-7");
    // And the dead letter.
    let filter = DeadLetterFilter {
        pattern: Some(ChannelPattern::new(TASKS_ESCALATED).unwrap()),
        ..DeadLetterFilter::default()
    };
    let mut letters = Vec::new();
    for _ in 0..2000 {
        letters = bus.transport().dead_letters(filter.clone()).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, DeadReason::Rejected);
    assert_eq!(
        letters[0].envelope.header.correlation_id.as_deref(),
        Some("sched-task")
    );
    assert!(letters[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("every attempt timed out"));
    let stats = sup.stats();
    assert_eq!((stats.escalated, stats.timeouts, stats.retries), (1, 3, 2));
    let per_agent = sup.agent_stats();
    let sched = per_agent.iter().find(|s| s.agent_id == "sched-1").unwrap();
    assert_eq!((sched.assigned, sched.timed_out), (2, 2));
    sup.shutdown();
}

#[tokio::test]
async fn a_failing_task_with_no_options_left_fails_and_a_permanent_error_fails_at_once() {
    let bus = Bus::memory();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let runs = Arc::new(AtomicU32::new(0));
    let count = runs.clone();
    let _worker = Worker::builder(AgentDescriptor::new("bad-1", "bad").capability("bad"))
        .heartbeat(Duration::from_secs(1))
        .handle(move |task| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                if task.input == json!("permanent") {
                    Err(TaskError::permanent("the input can never work"))
                } else {
                    Err(TaskError::retryable("disk full"))
                }
            }
        })
        .spawn(&bus)
        .await
        .unwrap();
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    let outcome = sup
        .submit(TaskSpec::capability("bad").input(json!("x")).retries(2))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(
        outcome.attempts, 3,
        "the first try and two retries; no other agent to back up"
    );
    assert_eq!(outcome.error.as_deref(), Some("disk full"));
    let before = runs.load(Ordering::SeqCst);
    let outcome = sup
        .submit(
            TaskSpec::capability("bad")
                .input(json!("permanent"))
                .retries(2),
        )
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(outcome.attempts, 1);
    assert_eq!(runs.load(Ordering::SeqCst), before + 1);
    sup.shutdown();
}

#[tokio::test]
async fn the_circuit_breaker_opens_half_opens_and_closes() {
    let (bus, clock) = manual_bus();
    let options = SupervisorOptions {
        breaker: BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(10),
            half_open_trials: 1,
            success_threshold: 1,
        },
        retries: 0,
        ..SupervisorOptions::default()
    };
    let sup = supervisor(&bus, options).await;
    let healthy = Arc::new(AtomicBool::new(false));
    let ok = healthy.clone();
    let _flaky = Worker::builder(AgentDescriptor::new("flaky", "flaky").capability("pay"))
        .heartbeat(Duration::from_secs(600))
        .handle(move |_| {
            let ok = ok.load(Ordering::SeqCst);
            async move {
                if ok {
                    Ok(json!("paid"))
                } else {
                    Err(TaskError::retryable("gateway 503"))
                }
            }
        })
        .spawn(&bus)
        .await
        .unwrap();
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    for _ in 0..2 {
        let outcome = sup
            .submit(TaskSpec::agent("flaky"))
            .await
            .unwrap()
            .wait()
            .await;
        assert_eq!(outcome.status, TaskStatus::Failed);
    }
    assert_eq!(sup.breaker("flaky"), BreakerState::Open);
    let error = sup.submit(TaskSpec::agent("flaky")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NoAgentFound);
    assert!(error.to_string().contains("circuit breaker"), "{error}");
    let error = sup.submit(TaskSpec::capability("pay")).await.unwrap_err();
    assert!(
        error.to_string().contains("circuit breaker open for flaky"),
        "{error}"
    );

    clock.advance(Duration::from_secs(10));
    assert_eq!(sup.breaker("flaky"), BreakerState::HalfOpen);
    // A failed probe opens it again.
    let outcome = sup
        .submit(TaskSpec::agent("flaky"))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(sup.breaker("flaky"), BreakerState::Open);
    clock.advance(Duration::from_secs(10));
    assert_eq!(sup.breaker("flaky"), BreakerState::HalfOpen);
    healthy.store(true, Ordering::SeqCst);
    let outcome = sup
        .submit(TaskSpec::agent("flaky"))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.status, TaskStatus::Completed);
    assert_eq!(sup.breaker("flaky"), BreakerState::Closed);
    let stats = sup.agent_stats();
    assert_eq!(stats[0].breaker, BreakerState::Closed);
    assert_eq!((stats[0].failed, stats[0].completed), (3, 1));
    sup.shutdown();
}

#[tokio::test]
async fn an_open_breaker_steers_capability_work_to_other_agents() {
    let bus = Bus::memory();
    let options = SupervisorOptions {
        breaker: BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::from_secs(3600),
            ..BreakerConfig::default()
        },
        retries: 0,
        strategy: Strategy::RoundRobin,
        ..SupervisorOptions::default()
    };
    let sup = supervisor(&bus, options).await;
    let _broken = Worker::builder(AgentDescriptor::new("a-broken", "w").capability("work"))
        .heartbeat(Duration::from_secs(1))
        .handle(|_| async { Err(TaskError::retryable("broken")) })
        .spawn(&bus)
        .await
        .unwrap();
    let _good = echo_worker(&bus, "b-good", "work", Duration::from_secs(1)).await;
    within("agents", sup.registry().wait_for(|a| a.len() == 2)).await;
    // Round robin starts with a-broken; its failure opens its breaker and the backup
    // (same capability) completes the task on b-good.
    let outcome = sup
        .submit(TaskSpec::capability("work"))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(outcome.status, TaskStatus::Completed);
    assert_eq!(outcome.agent.as_deref(), Some("b-good"));
    assert_eq!(sup.breaker("a-broken"), BreakerState::Open);
    for _ in 0..4 {
        let outcome = sup
            .submit(TaskSpec::capability("work"))
            .await
            .unwrap()
            .wait()
            .await;
        assert_eq!(outcome.agent.as_deref(), Some("b-good"));
        assert_eq!(outcome.attempts, 1);
    }
    sup.shutdown();
}

#[tokio::test]
async fn a_dead_agents_task_is_redistributed_and_finishes_once() {
    let (bus, clock) = manual_bus();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let (stuck, stuck_runs) =
        hanging_worker(&bus, "t-1-stuck", "transform", Duration::from_secs(1)).await;
    within("stuck agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    let handle = sup
        .submit(
            TaskSpec::capability("transform")
                .input(json!({"batch": 3}))
                .timeout(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    eventually("stuck agent has the task", || {
        stuck_runs.load(Ordering::SeqCst) == 1
    })
    .await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let seen = runs.clone();
    let healthy = Worker::builder(AgentDescriptor::new("t-2", "transform").capability("transform"))
        .heartbeat(Duration::from_secs(1))
        .handle(move |task| {
            seen.lock().push(task.task_id.clone());
            async move { Ok(json!({"done": task.input})) }
        })
        .spawn(&bus)
        .await
        .unwrap();
    within("second agent", sup.registry().wait_for(|a| a.len() == 2)).await;
    stuck.abort();
    // Over 3 s of silence makes t-1-stuck unhealthy; t-2 keeps heartbeating.
    advance(
        &clock,
        Duration::from_millis(3600),
        Duration::from_millis(200),
    )
    .await;
    let outcome = within("redistributed task", handle.wait()).await;
    assert_eq!(outcome.status, TaskStatus::Completed);
    assert_eq!(outcome.agent.as_deref(), Some("t-2"));
    assert_eq!(runs.lock().len(), 1);
    let record = sup.task(&outcome.task_id).unwrap();
    assert_eq!(record.redistributed, 1);
    assert_eq!(record.agents_tried, ["t-1-stuck", "t-2"]);
    assert!(record
        .history
        .iter()
        .any(|e| e.detail.contains("redistributed from 't-1-stuck'")));
    assert_eq!(sup.stats().redistributed, 1);
    let stuck_stats = sup
        .agent_stats()
        .into_iter()
        .find(|s| s.agent_id == "t-1-stuck")
        .unwrap();
    assert_eq!(stuck_stats.redistributed_away, 1);
    healthy.stop(Duration::from_secs(1)).await;
    sup.shutdown();
}

#[tokio::test]
async fn strategies_pick_through_real_workers() {
    let bus = Bus::memory();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let mut workers = Vec::new();
    for (id, region) in [("w-a", "us"), ("w-b", "eu"), ("w-c", "us")] {
        let me = id.to_string();
        workers.push(
            Worker::builder(
                AgentDescriptor::new(id, "w")
                    .capability("work")
                    .label("region", region),
            )
            .heartbeat(Duration::from_secs(1))
            .concurrency(8)
            .handle(move |_| {
                let me = me.clone();
                async move { Ok(json!(me)) }
            })
            .spawn(&bus)
            .await
            .unwrap(),
        );
    }
    within("agents", sup.registry().wait_for(|a| a.len() == 3)).await;
    let mut by = Vec::new();
    for _ in 0..6 {
        let o = sup
            .submit(TaskSpec::capability("work").strategy(Strategy::RoundRobin))
            .await
            .unwrap()
            .wait()
            .await;
        by.push(o.agent.unwrap());
    }
    assert_eq!(by, ["w-a", "w-b", "w-c", "w-a", "w-b", "w-c"]);
    let eu = Strategy::Affinity {
        labels: BTreeMap::from([("region".to_string(), "eu".to_string())]),
    };
    for _ in 0..3 {
        let o = sup
            .submit(TaskSpec::capability("work").strategy(eu.clone()))
            .await
            .unwrap()
            .wait()
            .await;
        assert_eq!(o.agent.as_deref(), Some("w-b"));
    }
    // Least loaded spreads a burst submitted at once.
    let mut handles = Vec::new();
    for _ in 0..6 {
        handles.push(sup.submit(TaskSpec::capability("work")).await.unwrap());
    }
    let mut counts = BTreeMap::new();
    for h in handles {
        *counts.entry(h.wait().await.agent.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "a burst goes to every agent: {counts:?}");
    sup.shutdown();
}

#[tokio::test]
async fn broadcasts_reach_every_listener() {
    let bus = Bus::memory();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let pattern = ChannelPattern::new(COORDINATION_BROADCAST).unwrap();
    let mut one = bus
        .subscribe_typed::<CoordinationMessage>(SubscribeOptions::new(pattern.clone()))
        .await
        .unwrap();
    let mut two = bus
        .subscribe_typed::<CoordinationMessage>(SubscribeOptions::new(pattern))
        .await
        .unwrap();
    let receipt = sup
        .broadcast(&CoordinationMessage {
            topic: "pause".into(),
            body: json!({"until": "maintenance over"}),
            labels: BTreeMap::new(),
        })
        .await
        .unwrap();
    assert_eq!(receipt.groups, 2);
    for sub in [&mut one, &mut two] {
        let m = within("broadcast", sub.next()).await.unwrap();
        assert_eq!(m.message.topic, "pause");
        assert_eq!(
            m.delivery.envelope().header.sender.as_deref(),
            Some(sup.id())
        );
    }
    sup.shutdown();
}

#[tokio::test]
async fn duplicate_task_ids_and_zero_timeouts_are_refused() {
    let bus = Bus::memory();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let _w = echo_worker(&bus, "e", "echo", Duration::from_secs(1)).await;
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    sup.submit(TaskSpec::capability("echo").id("same"))
        .await
        .unwrap();
    let e = sup
        .submit(TaskSpec::capability("echo").id("same"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = sup
        .submit(TaskSpec::capability("echo").timeout(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    sup.shutdown();
}

#[tokio::test]
async fn a_task_can_wait_for_an_agent_and_escalates_if_none_comes() {
    let (bus, clock) = manual_bus();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let waiting = sup
        .submit(
            TaskSpec::capability("late")
                .wait_for_agent(true)
                .timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!(sup.task(waiting.id()).unwrap().status, TaskStatus::Pending);
    let _late = echo_worker(&bus, "late-1", "late", Duration::from_secs(600)).await;
    let outcome = within("assigned once the agent appeared", waiting.wait()).await;
    assert_eq!(outcome.status, TaskStatus::Completed);
    assert_eq!(outcome.agent.as_deref(), Some("late-1"));

    let nobody = sup
        .submit(
            TaskSpec::capability("nobody")
                .wait_for_agent(true)
                .timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(30));
    sup.check_timeouts().await;
    let outcome = within("escalated", nobody.wait()).await;
    assert_eq!(outcome.status, TaskStatus::Escalated);
    assert_eq!(outcome.attempts, 0);
    sup.shutdown();
}

#[tokio::test]
async fn an_assignment_that_cannot_be_sent_fails_the_task_at_once() {
    let bus = Bus::memory();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let _w = echo_worker(&bus, "e", "echo", Duration::from_secs(1)).await;
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    // Over the engine's 1 MiB payload limit: no retry can help.
    let huge = "x".repeat(2 * 1024 * 1024);
    let outcome = within(
        "failed at once, not after the 30 s timeout",
        sup.submit(TaskSpec::capability("echo").input(json!(huge)).retries(3))
            .await
            .unwrap()
            .wait(),
    )
    .await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(outcome.attempts, 1);
    let error = outcome.error.unwrap();
    assert!(
        error.contains("could not be sent") && error.contains("over the limit"),
        "{error}"
    );
    sup.shutdown();
}

#[tokio::test]
async fn workers_hear_coordination_broadcasts() {
    let bus = Bus::memory();
    let sup = supervisor(&bus, SupervisorOptions::default()).await;
    let heard = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for id in ["listener-1", "listener-2"] {
        let heard = heard.clone();
        let me = id.to_string();
        workers.push(
            Worker::builder(AgentDescriptor::new(id, "l").capability("listen"))
                .heartbeat(Duration::from_secs(1))
                .handle(|_| async { Ok(json!(null)) })
                .on_coordination(move |m| heard.lock().push((me.clone(), m.topic)))
                .spawn(&bus)
                .await
                .unwrap(),
        );
    }
    for topic in ["pause", "resume"] {
        sup.broadcast(&CoordinationMessage {
            topic: topic.into(),
            body: json!({}),
            labels: BTreeMap::new(),
        })
        .await
        .unwrap();
    }
    eventually("both workers heard both", || heard.lock().len() == 4).await;
    let heard = heard.lock().clone();
    for id in ["listener-1", "listener-2"] {
        let topics: Vec<&str> = heard
            .iter()
            .filter(|(who, _)| who == id)
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(topics, ["pause", "resume"], "in order, for {id}");
    }
    for worker in workers {
        worker.stop(Duration::from_secs(1)).await;
    }
    sup.shutdown();
}
