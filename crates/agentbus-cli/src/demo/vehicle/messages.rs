//! The vehicle predictive-maintenance vocabulary of seed 000: message types and the
//! `channel.*` names, ready to reuse.

use agentbus::Message;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The channels of seed 000 ("Communication Channels").
pub(crate) mod channels {
    pub(crate) const VEHICLE_DATA_INPUT: &str = "channel.vehicle.data.input";
    pub(crate) const DATA_ANALYSIS_REQUEST: &str = "channel.data_analysis.request";
    pub(crate) const DATA_ANALYSIS_RESULT: &str = "channel.data_analysis.result";
    pub(crate) const CUSTOMER_ENGAGEMENT_REQUEST: &str = "channel.customer_engagement.request";
    pub(crate) const CUSTOMER_ENGAGEMENT_RESULT: &str = "channel.customer_engagement.result";
    pub(crate) const SCHEDULING_REQUEST: &str = "channel.scheduling.request";
    pub(crate) const SCHEDULING_BACKUP_REQUEST: &str = "channel.scheduling.backup.request";
    pub(crate) const SCHEDULING_RESULT: &str = "channel.scheduling.result";
    pub(crate) const FEEDBACK_INPUT: &str = "channel.feedback.input";
    pub(crate) const FEEDBACK_PROCESSED: &str = "channel.feedback.processed";
    pub(crate) const MANUFACTURING_INSIGHTS: &str = "channel.manufacturing.insights";
    pub(crate) const ORCHESTRATOR_COMMAND: &str = "channel.orchestrator.command";
    pub(crate) const SYSTEM_ERROR: &str = "channel.system.error";
    pub(crate) const SYSTEM_TIMEOUT: &str = "channel.system.timeout";
}

/// Sensor readings of one vehicle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct Sensors {
    pub(crate) engine_temp_c: f64,
    pub(crate) oil_pressure_kpa: f64,
    pub(crate) brake_pad_mm: f64,
    pub(crate) battery_v: f64,
}

/// `VEHICLE_DATA`: external system → orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct VehicleData {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) mileage_km: u32,
    pub(crate) sensors: Sensors,
}
impl Message for VehicleData {
    const KIND: &'static str = "vehicle.data";
}

/// `ANALYSIS_REQUEST`: orchestrator → data analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct AnalysisRequest {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) mileage_km: u32,
    pub(crate) sensors: Sensors,
}
impl Message for AnalysisRequest {
    const KIND: &'static str = "analysis.request";
}

/// One predicted problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct Issue {
    pub(crate) component: String,
    /// 1 (watch) to 4 (safety critical).
    pub(crate) severity: u8,
    pub(crate) predicted_failure_days: u32,
}

/// `ANALYSIS_RESULT`: data analysis → orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct AnalysisResult {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) issues: Vec<Issue>,
    pub(crate) risk_score: f64,
    pub(crate) analysed_by: String,
}
impl Message for AnalysisResult {
    const KIND: &'static str = "analysis.result";
}

/// `CUSTOMER_ENGAGEMENT`: orchestrator → customer engagement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct CustomerEngagement {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) message: String,
    pub(crate) contact_channel: String,
    pub(crate) components: Vec<String>,
}
impl Message for CustomerEngagement {
    const KIND: &'static str = "customer.engagement";
}

/// The customer's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct EngagementResult {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) accepted: bool,
    pub(crate) preferred_day: String,
    pub(crate) components: Vec<String>,
}
impl Message for EngagementResult {
    const KIND: &'static str = "customer.engagement.result";
}

/// `SCHEDULING_REQUEST`: orchestrator → scheduling (or its backup).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct SchedulingRequest {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) components: Vec<String>,
    pub(crate) preferred_day: String,
    /// Which try this is: 1 first, 2 retry of the same agent, 3 the backup.
    pub(crate) attempt: u32,
}
impl Message for SchedulingRequest {
    const KIND: &'static str = "scheduling.request";
}

/// `SCHEDULING_RESULT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct SchedulingResult {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) appointment_id: String,
    pub(crate) service_center: String,
    pub(crate) slot: String,
    pub(crate) scheduled_by: String,
    pub(crate) components: Vec<String>,
}
impl Message for SchedulingResult {
    const KIND: &'static str = "scheduling.result";
}

/// `FEEDBACK`: external system → orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct Feedback {
    pub(crate) vehicle_id: String,
    pub(crate) customer_id: String,
    pub(crate) rating: u8,
    pub(crate) comment: String,
    pub(crate) components: Vec<String>,
}
impl Message for Feedback {
    const KIND: &'static str = "feedback";
}

/// Feedback after the orchestrator processed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct FeedbackProcessed {
    pub(crate) vehicle_id: String,
    pub(crate) rating: u8,
    pub(crate) sentiment: String,
    pub(crate) components: Vec<String>,
}
impl Message for FeedbackProcessed {
    const KIND: &'static str = "feedback.processed";
}

/// `MANUFACTURING_INSIGHT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct ManufacturingInsight {
    pub(crate) component: String,
    pub(crate) occurrences: u32,
    pub(crate) average_rating: f64,
    pub(crate) recommendation: String,
    pub(crate) affected_vehicles: Vec<String>,
}
impl Message for ManufacturingInsight {
    const KIND: &'static str = "manufacturing.insight";
}

/// `ERROR`: any agent → orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct ErrorReport {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) source_agent: String,
    pub(crate) vehicle_id: Option<String>,
}
impl Message for ErrorReport {
    const KIND: &'static str = "error";
}

/// A timeout escalated for manual handling, on `channel.system.timeout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct TimeoutEscalation {
    pub(crate) vehicle_id: String,
    pub(crate) stage: String,
    pub(crate) attempts: u32,
    pub(crate) tried: Vec<String>,
    pub(crate) action: String,
}
impl Message for TimeoutEscalation {
    const KIND: &'static str = "timeout.escalation";
}

/// An orchestrator command broadcast to every worker (`channel.orchestrator.command`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct Command {
    pub(crate) command: String,
}
impl Message for Command {
    const KIND: &'static str = "orchestrator.command";
}

/// A worker's answer to a `status` command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub(crate) struct StatusReport {
    pub(crate) agent: String,
    pub(crate) handled: u64,
}
impl Message for StatusReport {
    const KIND: &'static str = "status.report";
}
