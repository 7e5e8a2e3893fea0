//! Two agents talking: a planner asks a weather agent for a forecast and acts on it.
//!
//! Run with `cargo run -p agentbus --example two_agents`.

use std::time::Duration;

use agentbus::{Agent, AgentDescriptor, Bus, ChannelName, Context, Message};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct ForecastRequest {
    city: String,
}
impl Message for ForecastRequest {
    const KIND: &'static str = "weather.forecast.request";
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct Forecast {
    city: String,
    rain_mm: f64,
}
impl Message for Forecast {
    const KIND: &'static str = "weather.forecast";
}

#[tokio::main]
async fn main() -> agentbus::Result<()> {
    let bus = Bus::memory();

    // The weather agent answers forecast requests on `weather.requests`.
    let weather = Agent::builder(
        AgentDescriptor::new("weather-1", "weather")
            .capability("forecast")
            .sends::<Forecast>(),
    )
    .handle(
        "weather.requests",
        |ctx: Context, request: ForecastRequest| async move {
            let rain_mm = if request.city == "Bergen" { 12.5 } else { 0.0 };
            ctx.reply(&Forecast {
                city: request.city,
                rain_mm,
            })
            .await?;
            Ok(())
        },
    )
    .spawn(&bus)
    .await?;

    // The planner asks, as an agent that declared what it sends.
    let planner = Context::new(
        bus.clone(),
        AgentDescriptor::new("planner-1", "planner").sends::<ForecastRequest>(),
    );
    for city in ["Bergen", "Madrid"] {
        let forecast: Forecast = planner
            .request(
                &ChannelName::new("weather.requests")?,
                &ForecastRequest { city: city.into() },
                Duration::from_secs(2),
            )
            .await?;
        let plan = if forecast.rain_mm > 1.0 {
            "take the bus"
        } else {
            "cycle"
        };
        println!(
            "{}: {} mm of rain → {plan}",
            forecast.city, forecast.rain_mm
        );
    }

    weather.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
