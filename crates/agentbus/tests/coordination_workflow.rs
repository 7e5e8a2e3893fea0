//! Workflows: validation (cycles named), parallel steps, input mapping, failure
//! policies, sagas compensating in reverse order, status at any time, resume after a
//! supervisor restart, exactly-once step completion across redistribution, and
//! 1,000-step random DAGs (proptest).

mod coordination_common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::coordination::{
    read_workflow, CompensationSpec, FailurePolicy, Input, StepSpec, StepState, Supervisor,
    SupervisorOptions, Target, TaskError, Worker, WorkflowEvent, WorkflowRecord, WorkflowSpec,
    WorkflowState,
};
use agentbus::{AgentDescriptor, Bus, ChannelPattern, ErrorKind, StartPosition, SubscribeOptions};
use coordination_common::{advance, eventually, manual_bus, within};
use parking_lot::Mutex;
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::sync::{Barrier, Notify};

/// A worker for `capability` whose handler is `f`.
async fn worker<F, Fut>(bus: &Bus, id: &str, capability: &str, concurrency: usize, f: F) -> Worker
where
    F: Fn(agentbus::coordination::TaskRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    Worker::builder(AgentDescriptor::new(id, capability).capability(capability))
        .heartbeat(Duration::from_secs(1))
        .concurrency(concurrency)
        .handle(f)
        .spawn(bus)
        .await
        .unwrap()
}

async fn supervisor(bus: &Bus) -> Supervisor {
    Supervisor::start(bus, SupervisorOptions::default())
        .await
        .unwrap()
}

#[test]
fn invalid_definitions_are_refused_and_cycles_named() {
    let cycle = WorkflowSpec::new("loop")
        .step(StepSpec::capability("a", "x").after(["c"]))
        .step(StepSpec::capability("b", "x").after(["a"]))
        .step(StepSpec::capability("c", "x").after(["b"]))
        .step(StepSpec::capability("free", "x"));
    let error = cycle.validate().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    let text = error.to_string();
    assert!(text.contains("a → c → b → a"), "{text}");

    // A cycle made through an input reference counts too.
    let via_input = WorkflowSpec::new("io")
        .step(StepSpec::capability("a", "x").input("v", Input::step("b", "")))
        .step(StepSpec::capability("b", "x").after(["a"]));
    assert!(via_input
        .validate()
        .unwrap_err()
        .to_string()
        .contains("cycle"));

    let unknown = WorkflowSpec::new("u").step(StepSpec::capability("a", "x").after(["zz"]));
    assert!(unknown
        .validate()
        .unwrap_err()
        .to_string()
        .contains("unknown step 'zz'"));
    let dup = WorkflowSpec::new("d")
        .step(StepSpec::capability("a", "x"))
        .step(StepSpec::capability("a", "y"));
    assert!(dup
        .validate()
        .unwrap_err()
        .to_string()
        .contains("appears twice"));
    let own = WorkflowSpec::new("s").step(StepSpec::capability("a", "x").after(["a"]));
    assert!(own
        .validate()
        .unwrap_err()
        .to_string()
        .contains("depends on itself"));
    assert!(WorkflowSpec::new("empty").validate().is_err());
    let order = WorkflowSpec::new("ok")
        .step(StepSpec::capability("load", "x").after(["t"]))
        .step(StepSpec::capability("t", "x").after(["e"]))
        .step(StepSpec::capability("e", "x"))
        .validate()
        .unwrap();
    assert_eq!(order, ["e", "t", "load"]);
}

#[tokio::test]
async fn a_cyclic_workflow_is_refused_by_the_supervisor() {
    let bus = Bus::memory();
    let sup = supervisor(&bus).await;
    let spec = WorkflowSpec::new("loop")
        .step(StepSpec::capability("a", "x").after(["b"]))
        .step(StepSpec::capability("b", "x").after(["a"]));
    let error = sup.start_workflow(spec, json!({})).await.unwrap_err();
    assert!(error.to_string().contains("a → b → a"), "{error}");
    sup.shutdown();
}

#[tokio::test]
async fn independent_steps_run_in_parallel_and_inputs_flow_from_outputs() {
    let bus = Bus::memory();
    let sup = supervisor(&bus).await;
    // Both transforms must be running at the same time to pass the barrier.
    let barrier = Arc::new(Barrier::new(2));
    let _extract = worker(&bus, "extract-1", "extract", 1, |task| async move {
        let n = task.input["n"].as_u64().unwrap_or(0);
        Ok(json!({ "rows": (1..=n).collect::<Vec<u64>>() }))
    })
    .await;
    let b = barrier.clone();
    let _transform = worker(&bus, "transform-1", "transform", 4, move |task| {
        let b = b.clone();
        async move {
            b.wait().await;
            let rows: Vec<u64> = serde_json::from_value(task.input["rows"].clone()).unwrap();
            let factor = task.input["factor"].as_u64().unwrap();
            Ok(json!(rows.iter().map(|r| r * factor).sum::<u64>()))
        }
    })
    .await;
    let _load = worker(&bus, "load-1", "load", 1, |task| async move {
        Ok(json!({ "total": task.input["double"].as_u64().unwrap() + task.input["triple"].as_u64().unwrap() }))
    })
    .await;
    within("agents", sup.registry().wait_for(|a| a.len() == 3)).await;
    let spec = WorkflowSpec::new("etl")
        .step(StepSpec::capability("extract", "extract").input("n", Input::workflow("/rows")))
        .step(
            StepSpec::capability("double", "transform")
                .input("rows", Input::step("extract", "/rows"))
                .input("factor", Input::value(json!(2))),
        )
        .step(
            StepSpec::capability("triple", "transform")
                .input("rows", Input::step("extract", "/rows"))
                .input("factor", Input::value(json!(3))),
        )
        .step(
            StepSpec::capability("load", "load")
                .input("double", Input::step("double", ""))
                .input("triple", Input::step("triple", "")),
        );
    let handle = sup.start_workflow(spec, json!({"rows": 4})).await.unwrap();
    let status = within("workflow", handle.wait()).await;
    assert_eq!(status.state, WorkflowState::Completed, "{status:?}");
    // 1+2+3+4 = 10; 20 + 30.
    assert_eq!(
        status.step("load").unwrap().output,
        Some(json!({"total": 50}))
    );
    for step in &status.steps {
        assert_eq!(step.state, StepState::Completed);
        assert!(step.started_at.is_some() && step.finished_at.is_some());
        assert!(step.duration_ms.is_some());
    }
    // Queryable through the supervisor and, from the bus, by anyone.
    assert_eq!(
        sup.workflow(&status.id).unwrap().state,
        WorkflowState::Completed
    );
    let from_bus = read_workflow(&bus, &status.id).await.unwrap();
    assert_eq!(from_bus.state, WorkflowState::Completed);
    assert_eq!(from_bus.steps, status.steps);
    sup.shutdown();
}

#[tokio::test]
async fn status_is_queryable_while_running() {
    let bus = Bus::memory();
    let sup = supervisor(&bus).await;
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let _w = worker(&bus, "slow-1", "slow", 1, move |_| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok(json!("ok"))
        }
    })
    .await;
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    let spec = WorkflowSpec::new("two")
        .step(StepSpec::capability("first", "slow"))
        .step(StepSpec::capability("second", "slow").after(["first"]));
    let handle = sup.start_workflow(spec, json!(null)).await.unwrap();
    eventually("first running", || {
        handle.status().step("first").unwrap().state == StepState::Running
    })
    .await;
    let now = sup.workflow(handle.id()).unwrap();
    assert_eq!(now.state, WorkflowState::Running);
    assert_eq!(now.step("second").unwrap().state, StepState::Waiting);
    assert!(now.step("first").unwrap().task_id.is_some());
    gate.notify_one();
    eventually("second running", || {
        handle.status().step("second").unwrap().state == StepState::Running
    })
    .await;
    gate.notify_one();
    let done = within("done", handle.wait()).await;
    assert_eq!(done.state, WorkflowState::Completed);
    sup.shutdown();
}

/// Workers for a saga: every call and compensation is logged in order.
async fn saga_workers(bus: &Bus, log: Arc<Mutex<Vec<String>>>) -> Vec<Worker> {
    let l = log.clone();
    let step = worker(bus, "saga-steps", "do", 4, move |task| {
        let l = l.clone();
        async move {
            let name = task.input["name"].as_str().unwrap_or("?").to_string();
            l.lock().push(format!("do:{name}"));
            if name == "charge-card" {
                return Err(TaskError::permanent("card declined"));
            }
            Ok(json!({ "ref": format!("{name}-ref") }))
        }
    })
    .await;
    let l = log.clone();
    let undo = worker(bus, "saga-undo", "undo", 4, move |task| {
        let l = l.clone();
        async move {
            let name = task.input["name"].as_str().unwrap_or("?").to_string();
            let reference = task.input["ref"].as_str().unwrap_or("?").to_string();
            l.lock().push(format!("undo:{name}:{reference}"));
            Ok(json!("undone"))
        }
    })
    .await;
    vec![step, undo]
}

fn saga_step(name: &str, compensated: bool) -> StepSpec {
    let mut step = StepSpec::capability(name, "do").input("name", Input::value(json!(name)));
    if compensated {
        step = step.compensate(
            CompensationSpec::new(Target::Capability("undo".into()))
                .input("name", Input::value(json!(name)))
                .input("ref", Input::step(name, "/ref")),
        );
    }
    step
}

#[tokio::test]
async fn a_failed_saga_runs_exactly_the_compensations_it_owes_in_reverse_order() {
    let bus = Bus::memory();
    let sup = supervisor(&bus).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let _workers = saga_workers(&bus, log.clone()).await;
    within("agents", sup.registry().wait_for(|a| a.len() == 2)).await;
    // reserve-flight → reserve-hotel → notify (no compensation) → charge-card (fails)
    //                                                   → ship (never runs)
    let spec = WorkflowSpec::new("trip")
        .on_failure(FailurePolicy::Compensate)
        .step(saga_step("reserve-flight", true))
        .step(saga_step("reserve-hotel", true).after(["reserve-flight"]))
        .step(saga_step("notify", false).after(["reserve-hotel"]))
        .step(saga_step("charge-card", true).after(["notify"]))
        .step(saga_step("ship", true).after(["charge-card"]));
    let handle = sup.start_workflow(spec, json!({})).await.unwrap();
    let status = within("saga", handle.clone().wait()).await;
    assert_eq!(status.state, WorkflowState::Compensated, "{status:?}");
    assert_eq!(
        *log.lock(),
        [
            "do:reserve-flight",
            "do:reserve-hotel",
            "do:notify",
            "do:charge-card",
            "undo:reserve-hotel:reserve-hotel-ref",
            "undo:reserve-flight:reserve-flight-ref",
        ]
    );
    let compensated: Vec<&str> = status
        .compensations
        .iter()
        .map(|c| c.step.as_str())
        .collect();
    assert_eq!(compensated, ["reserve-hotel", "reserve-flight"]);
    assert!(status
        .compensations
        .iter()
        .all(|c| c.state == "completed" && c.finished_at.is_some()));
    assert_eq!(status.step("charge-card").unwrap().state, StepState::Failed);
    assert!(status
        .step("charge-card")
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("card declined"));
    assert_eq!(status.step("notify").unwrap().state, StepState::Completed);
    assert_eq!(status.step("ship").unwrap().state, StepState::Waiting);
    assert_eq!(
        status.step("reserve-flight").unwrap().state,
        StepState::Compensated
    );
    // The record on the bus holds the same compensations.
    let from_bus = read_workflow(&bus, handle.id()).await.unwrap();
    assert_eq!(from_bus.compensations, status.compensations);
    sup.shutdown();
}

#[tokio::test]
async fn fail_fast_stops_and_continue_runs_what_does_not_depend_on_the_failure() {
    let bus = Bus::memory();
    let sup = supervisor(&bus).await;
    let _w = worker(&bus, "w", "work", 4, |task| async move {
        if task.input["fail"] == json!(true) {
            Err(TaskError::permanent("boom"))
        } else {
            Ok(json!("ok"))
        }
    })
    .await;
    within("agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    let build = |policy| {
        WorkflowSpec::new("p")
            .on_failure(policy)
            .step(StepSpec::capability("bad", "work").input("fail", Input::value(json!(true))))
            .step(StepSpec::capability("after-bad", "work").after(["bad"]))
            .step(StepSpec::capability("gate", "work"))
            .step(StepSpec::capability("after-gate", "work").after(["gate"]))
    };
    let status = sup
        .start_workflow(build(FailurePolicy::Continue), json!({}))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(status.state, WorkflowState::Failed);
    assert_eq!(status.step("bad").unwrap().state, StepState::Failed);
    assert_eq!(status.step("after-bad").unwrap().state, StepState::Skipped);
    assert_eq!(
        status.step("after-gate").unwrap().state,
        StepState::Completed
    );
    assert!(status.error.as_deref().unwrap().contains("bad"));

    let status = sup
        .start_workflow(build(FailurePolicy::FailFast).max_parallel(1), json!({}))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(status.state, WorkflowState::Failed);
    // With one step at a time, "bad" (declared first) runs first and nothing else starts.
    assert_eq!(status.step("after-gate").unwrap().state, StepState::Skipped);
    assert_eq!(status.step("gate").unwrap().state, StepState::Skipped);
    sup.shutdown();
}

#[tokio::test]
async fn a_restarted_supervisor_resumes_a_running_workflow() {
    let bus = Bus::memory();
    let first = supervisor(&bus).await;
    let extract_runs = Arc::new(AtomicU32::new(0));
    let runs = extract_runs.clone();
    let _extract = worker(&bus, "extract-1", "extract", 1, move |_| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move { Ok(json!({"rows": 3})) }
    })
    .await;
    let gate = Arc::new(Notify::new());
    let load_runs = Arc::new(AtomicU32::new(0));
    let (g, lr) = (gate.clone(), load_runs.clone());
    let _load = worker(&bus, "load-1", "load", 4, move |task| {
        let g = g.clone();
        let n = lr.fetch_add(1, Ordering::SeqCst);
        async move {
            // The first run hangs as if its supervisor's answer were lost; the run
            // the resumed workflow starts finishes.
            if n == 0 {
                g.notified().await;
            }
            Ok(json!({"loaded": task.input["rows"]}))
        }
    })
    .await;
    within("agents", first.registry().wait_for(|a| a.len() == 2)).await;
    let spec = WorkflowSpec::new("resumable")
        .id("wf-resume-1")
        .step(StepSpec::capability("extract", "extract"))
        .step(StepSpec::capability("load", "load").input("rows", Input::step("extract", "/rows")));
    let handle = first.start_workflow(spec, json!({})).await.unwrap();
    eventually("load running", || load_runs.load(Ordering::SeqCst) == 1).await;
    assert_eq!(
        handle.status().step("extract").unwrap().state,
        StepState::Completed
    );
    first.shutdown();
    drop(first);

    let second = supervisor(&bus).await;
    let resumed = within("resumed", async {
        loop {
            if let Some(s) = second.workflow("wf-resume-1") {
                if s.state.is_final() {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(resumed.state, WorkflowState::Completed, "{resumed:?}");
    assert_eq!(
        extract_runs.load(Ordering::SeqCst),
        1,
        "completed steps are not run again"
    );
    assert_eq!(
        resumed.step("load").unwrap().output,
        Some(json!({"loaded": 3}))
    );
    assert_eq!(resumed.supervisor, second.id());
    gate.notify_one();
    // The bus holds the whole story: started, resumed, one completion per step.
    let events = workflow_events(&bus, "wf-resume-1").await;
    assert!(events
        .iter()
        .any(|e| matches!(e, WorkflowEvent::Resumed { .. })));
    assert_eq!(completions(&events, "extract"), 1);
    assert_eq!(completions(&events, "load"), 1);
    second.shutdown();
}

async fn workflow_events(bus: &Bus, id: &str) -> Vec<WorkflowEvent> {
    let mut sub = bus
        .subscribe_typed::<WorkflowRecord>(
            SubscribeOptions::new(ChannelPattern::new(format!("_sys.workflows.{id}")).unwrap())
                .start(StartPosition::Earliest),
        )
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Ok(Ok(record)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        record.delivery.ack().await.unwrap();
        events.push(record.message.event);
    }
    events
}

fn completions(events: &[WorkflowEvent], step: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, WorkflowEvent::StepCompleted { step: s, .. } if s == step))
        .count()
}

#[tokio::test]
async fn a_dead_agents_step_finishes_elsewhere_exactly_once() {
    let (bus, clock) = manual_bus();
    let sup = supervisor(&bus).await;
    let stuck_runs = Arc::new(AtomicU32::new(0));
    let sr = stuck_runs.clone();
    let stuck = Worker::builder(AgentDescriptor::new("a-stuck", "t").capability("transform"))
        .heartbeat(Duration::from_secs(1))
        .handle(move |_| {
            sr.fetch_add(1, Ordering::SeqCst);
            async move {
                futures::future::pending::<()>().await;
                Ok(json!(null))
            }
        })
        .spawn(&bus)
        .await
        .unwrap();
    within("stuck agent", sup.registry().wait_for(|a| a.len() == 1)).await;
    let spec = WorkflowSpec::new("once")
        .step(StepSpec::capability("t", "transform").timeout(Duration::from_secs(600)));
    let handle = sup.start_workflow(spec, json!({})).await.unwrap();
    eventually("stuck agent has it", || {
        stuck_runs.load(Ordering::SeqCst) == 1
    })
    .await;
    let good_runs = Arc::new(AtomicU32::new(0));
    let gr = good_runs.clone();
    let _good = Worker::builder(AgentDescriptor::new("b-good", "t").capability("transform"))
        .heartbeat(Duration::from_secs(1))
        .handle(move |_| {
            gr.fetch_add(1, Ordering::SeqCst);
            async move { Ok(json!("transformed")) }
        })
        .spawn(&bus)
        .await
        .unwrap();
    within("good agent", sup.registry().wait_for(|a| a.len() == 2)).await;
    stuck.abort();
    advance(
        &clock,
        Duration::from_millis(3600),
        Duration::from_millis(200),
    )
    .await;
    let status = within("workflow", handle.clone().wait()).await;
    assert_eq!(status.state, WorkflowState::Completed);
    assert_eq!(status.step("t").unwrap().agent.as_deref(), Some("b-good"));
    assert_eq!(good_runs.load(Ordering::SeqCst), 1);
    let events = workflow_events(&bus, handle.id()).await;
    assert_eq!(completions(&events, "t"), 1);
    assert_eq!(sup.stats().redistributed, 1);
    sup.shutdown();
}

#[tokio::test]
async fn unknown_workflows_are_not_found() {
    let bus = Bus::memory();
    let error = read_workflow(&bus, "wf-nope").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert!(error.to_string().contains("wf-nope"));
}

/// A random DAG: each step depends on up to 3 earlier steps (by a random order), and
/// the steps are declared shuffled.
fn random_dag(n: usize, seed: u64) -> (WorkflowSpec, HashMap<String, Vec<String>>) {
    let mut rng = fastrand_like(seed);
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    let mut steps = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("s{i}");
        let mut mine: Vec<String> = Vec::new();
        if i > 0 {
            for _ in 0..(rng() % 4) {
                let dep = format!("s{}", rng() as usize % i);
                if !mine.contains(&dep) {
                    mine.push(dep);
                }
            }
        }
        let mut step = StepSpec::capability(&id, "work").input("me", Input::value(json!(id)));
        for dep in &mine {
            step = step.input(dep.clone(), Input::step(dep.clone(), "/me"));
        }
        deps.insert(id, mine);
        steps.push(step);
    }
    // Fisher-Yates with the same generator.
    for i in (1..steps.len()).rev() {
        let j = rng() as usize % (i + 1);
        steps.swap(i, j);
    }
    let mut spec = WorkflowSpec::new("random");
    for step in steps {
        spec = spec.step(step);
    }
    (spec, deps)
}

/// A tiny deterministic generator (splitmix64), so a failing seed can be replayed.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

async fn run_random_dag(n: usize, seed: u64) {
    let bus = Bus::memory();
    let sup = Supervisor::start(
        &bus,
        SupervisorOptions {
            timeout: Duration::from_secs(120),
            ..SupervisorOptions::default()
        },
    )
    .await
    .unwrap();
    let (spec, deps) = random_dag(n, seed);
    let deps = Arc::new(deps);
    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..3 {
        let (deps, done, runs, violations) =
            (deps.clone(), done.clone(), runs.clone(), violations.clone());
        workers.push(
            worker(&bus, &format!("dag-{w}"), "work", 16, move |task| {
                let me = task.input["me"].as_str().unwrap_or_default().to_string();
                *runs.lock().entry(me.clone()).or_insert(0) += 1;
                {
                    let done = done.lock();
                    for dep in &deps[&me] {
                        if !done.contains(dep) {
                            violations
                                .lock()
                                .push(format!("{me} started before {dep} completed"));
                        }
                        if task.input[dep] != json!(dep) {
                            violations
                                .lock()
                                .push(format!("{me} got {:?} for {dep}", task.input[dep]));
                        }
                    }
                }
                let done = done.clone();
                async move {
                    tokio::task::yield_now().await;
                    done.lock().insert(me.clone());
                    Ok(json!({ "me": me }))
                }
            })
            .await,
        );
    }
    within("agents", sup.registry().wait_for(|a| a.len() == 3)).await;
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        sup.start_workflow(spec, json!({})).await.unwrap().wait(),
    )
    .await
    .expect("the random DAG finished");
    assert_eq!(
        status.state,
        WorkflowState::Completed,
        "seed {seed}: {:?}",
        status.error
    );
    assert!(
        violations.lock().is_empty(),
        "seed {seed}: {:?}",
        &violations.lock()[..violations.lock().len().min(5)]
    );
    let runs = runs.lock();
    assert_eq!(runs.len(), n, "seed {seed}: every step ran");
    assert!(
        runs.values().all(|&r| r == 1),
        "seed {seed}: each step ran once"
    );
    sup.shutdown();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// 1,000-step random DAGs always complete, each step after all its dependencies,
    /// each exactly once, with the dependencies' outputs as inputs.
    #[test]
    fn random_thousand_step_dags_complete_in_dependency_order(seed in any::<u64>()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_random_dag(1000, seed));
    }
}

#[tokio::test]
async fn a_failed_compensation_is_recorded_and_the_others_still_run() {
    let bus = Bus::memory();
    let sup = supervisor(&bus).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let _workers = saga_workers(&bus, log.clone()).await;
    let _broken_undo = worker(&bus, "undo-broken", "undo-broken", 1, |_| async {
        Err(TaskError::permanent("refund service down"))
    })
    .await;
    within("agents", sup.registry().wait_for(|a| a.len() == 3)).await;
    let broken = StepSpec::capability("book-car", "do")
        .input("name", Input::value(json!("book-car")))
        .compensate(CompensationSpec::new(Target::Capability(
            "undo-broken".into(),
        )));
    let spec = WorkflowSpec::new("trip")
        .on_failure(FailurePolicy::Compensate)
        .step(saga_step("reserve-flight", true))
        .step(broken.after(["reserve-flight"]))
        .step(saga_step("charge-card", true).after(["book-car"]));
    let status = sup
        .start_workflow(spec, json!({}))
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(status.state, WorkflowState::CompensationFailed);
    let order: Vec<(&str, &str)> = status
        .compensations
        .iter()
        .map(|c| (c.step.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(
        order,
        [("book-car", "failed"), ("reserve-flight", "completed")]
    );
    assert!(log
        .lock()
        .contains(&"undo:reserve-flight:reserve-flight-ref".to_string()));
    sup.shutdown();
}

/// Soak: many more random 1,000-step DAGs than the proptest runs. Run by hand:
/// `cargo test --release -p agentbus --test coordination_workflow -- --ignored soak`.
#[test]
#[ignore = "soak: run by hand"]
fn soak_random_thousand_step_dags() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seeds: u64 = std::env::var("SOAK_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    for seed in 0..seeds {
        runtime.block_on(run_random_dag(
            1000,
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
    }
}
