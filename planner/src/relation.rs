//! The corrections (plus the metric suite and preprocessing, `evaluate((SELECT ...), batch => ..., label => ...)`)
//! as SQL relations: `balans((SELECT ...), batch => 'Metadata_Batch', k => 10)`
//! and `correct((SELECT ...), method => 'harmony', batch => ...)`, planned by a DataFusion
//! `RelationPlanner` into the same extension nodes as `balans correct`, so `EXPLAIN` shows
//! `Balans` / `BalansExec`.
//!
//! The first argument is a subquery in parentheses (its tables are resolved as usual); every
//! other argument is named: `batch` (required; comma-separated for several columns),
//! `features` / `exclude` (comma-separated names or regular expressions, as `--features`),
//! `negcon` (an SQL predicate, for sphering), and any correction parameter of
//! [`crate::parameters::PARAMETERS`].
//!
//! `preprocess(...)` runs its job while planning (its output columns come from the data):
//! the engine gives the planner that job as a [`PreprocessRunner`].

use std::sync::Arc;

use balans_operators::exec::BalansSpec;
use balans_operators::{BalansConfig, Method, NoProgress};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DFSchema, Result, ScalarValue, plan_datafusion_err, plan_err};
use datafusion::logical_expr::planner::{
    PlannedRelation, RelationPlanner, RelationPlannerContext, RelationPlanning,
};
use datafusion::logical_expr::{
    Expr, ExprSchemable, Extension, LogicalPlan, LogicalPlanBuilder, lit,
};
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, FunctionArg, FunctionArgExpr, TableFactor};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use balans_operators::exec::evaluate::{EvaluateSpec, METRIC_FAMILIES};

use crate::columns::{FeatureSelection, resolve_columns};
use crate::evaluate::{DEFAULT_PLATE_COLUMN, DEFAULT_WELL_COLUMN, EvaluateNode, canonical_columns};
use crate::node::{FIT_MASK_COLUMN, balans_plan};
use crate::parameters::set_parameter;
use crate::preprocess::{PreprocessNode, PreprocessRunner, SessionStateSource};

/// Plans `balans(...)`, `correct(...)`, `evaluate(...)` and `preprocess(...)` in `FROM`
/// clauses.
#[derive(Default)]
pub struct CorrectionRelationPlanner {
    session: SessionStateSource,
    preprocess: Option<Arc<dyn PreprocessRunner>>,
}

impl std::fmt::Debug for CorrectionRelationPlanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorrectionRelationPlanner")
            .field("session_bound", &self.session.get().is_some())
            .field("preprocess", &self.preprocess)
            .finish()
    }
}

impl CorrectionRelationPlanner {
    /// A planner whose `preprocess(...)` runs `runner` (without one, `preprocess(...)` is a
    /// planning error naming what is missing).
    pub fn with_preprocess(runner: Arc<dyn PreprocessRunner>) -> Self {
        Self {
            session: SessionStateSource::default(),
            preprocess: Some(runner),
        }
    }

    /// Gives the planner its session, which `preprocess(...)` runs its subquery in (the job
    /// runs while planning; see [`crate::preprocess`]). Only the first call counts.
    pub fn bind_session(
        &self,
        state: impl Fn() -> Option<datafusion::execution::SessionState> + Send + Sync + 'static,
    ) {
        let _ = self.session.set(Box::new(state));
    }
}

/// Text of a literal argument (`'x'`, `10`, `true`).
fn literal_text(context: &mut dyn RelationPlannerContext, expr: &SqlExpr) -> Result<String> {
    match context.sql_to_expr(expr.clone(), &DFSchema::empty())? {
        Expr::Literal(ScalarValue::Utf8(Some(s)), _)
        | Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _)
        | Expr::Literal(ScalarValue::Utf8View(Some(s)), _) => Ok(s),
        Expr::Literal(value, _) if !value.is_null() => Ok(value.to_string()),
        other => plan_err!("parameter values must be literals, got {other}"),
    }
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Removes the named argument `key` and returns its value.
pub fn take_named(named: &mut Vec<(String, String)>, key: &str) -> Option<String> {
    named
        .iter()
        .position(|(k, _)| k == key)
        .map(|i| named.remove(i).1)
}

/// `negcon => 'predicate'` as a boolean expression over `input` (null counts as false).
fn negcon_mask(
    function: &str,
    predicate: &str,
    input: &LogicalPlan,
    context: &mut dyn RelationPlannerContext,
) -> Result<Expr> {
    let parsed = Parser::new(&GenericDialect {})
        .try_with_sql(predicate)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| plan_datafusion_err!("{function}: negcon => '{predicate}' is not SQL: {e}"))?;
    let mask = context.sql_to_expr(parsed, input.schema())?;
    if mask.get_type(input.schema())? != DataType::Boolean {
        return plan_err!("{function}: negcon must be a boolean predicate");
    }
    Ok(datafusion::functions::expr_fn::coalesce(vec![
        mask,
        lit(false),
    ]))
}

/// `evaluate((SELECT ...), batch => ..., label => ...[, negcon, plate, well, features,
/// exclude, skip, seed, subsample])`: the canonical projection and the [`EvaluateNode`].
fn plan_evaluate(
    input: LogicalPlan,
    batch: Vec<String>,
    selection: FeatureSelection,
    negcon: Option<String>,
    mut named: Vec<(String, String)>,
    context: &mut dyn RelationPlannerContext,
) -> Result<LogicalPlan> {
    let label = take_named(&mut named, "label")
        .ok_or_else(|| plan_datafusion_err!("evaluate: label => 'COLUMN' is required"))?;
    let schema = input.schema().as_arrow().clone();
    let optional = |given: Option<String>, default: &str| -> Result<Option<String>> {
        match given {
            Some(name) if schema.index_of(&name).is_err() => {
                plan_err!("evaluate: column '{name}' is not in the input")
            }
            Some(name) => Ok(Some(name)),
            None => Ok(schema
                .index_of(default)
                .is_ok()
                .then(|| default.to_string())),
        }
    };
    let plate = optional(take_named(&mut named, "plate"), DEFAULT_PLATE_COLUMN)?;
    let well = optional(take_named(&mut named, "well"), DEFAULT_WELL_COLUMN)?;
    if schema.index_of(&label).is_err() {
        return plan_err!("evaluate: label column '{label}' is not in the input");
    }
    let skip: Vec<String> = take_named(&mut named, "skip")
        .map_or_else(Vec::new, |s| list(&s))
        .into_iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if let Some(bad) = skip.iter().find(|s| !METRIC_FAMILIES.contains(&s.as_str())) {
        return plan_err!(
            "evaluate: skip => '{bad}' is not a metric family (one of: {})",
            METRIC_FAMILIES.join(", ")
        );
    }
    let seed = match take_named(&mut named, "seed") {
        Some(s) => s.parse().map_err(|_| {
            plan_datafusion_err!("evaluate: seed => '{s}': expected a whole number")
        })?,
        None => 0,
    };
    let subsample = match take_named(&mut named, "subsample") {
        Some(s) => Some(s.parse().map_err(|_| {
            plan_datafusion_err!("evaluate: subsample => '{s}': expected a whole number")
        })?),
        None => None,
    };
    if let Some((key, _)) = named.first() {
        return plan_err!(
            "evaluate: unknown parameter '{key}' (one of: batch, label, negcon, plate, well, \
             features, exclude, skip, seed, subsample)"
        );
    }
    if plate.is_none() && !skip.iter().any(|s| s == "map") {
        return plan_err!(
            "evaluate: mAP needs a plate column (there is no '{DEFAULT_PLATE_COLUMN}'): name one \
             with plate => 'COL', or skip => 'map'"
        );
    }
    let mut roles = resolve_columns(&schema, &selection, &batch)
        .map_err(|e| plan_datafusion_err!("evaluate: {e}"))?;
    let roles_meta: Vec<&String> = [Some(&label), plate.as_ref(), well.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    roles.features.retain(|f| !roles_meta.contains(&f));
    if roles.features.is_empty() {
        return plan_err!("evaluate: no embedding columns left");
    }
    let mask = match &negcon {
        Some(predicate) => negcon_mask("evaluate", predicate, &input, context)?,
        None => lit(false),
    };
    let columns = canonical_columns(
        input.schema(),
        &roles.features,
        &roles.batch,
        &label,
        plate.as_deref(),
        well.as_deref(),
        mask,
    )?;
    let projected = LogicalPlanBuilder::from(input).project(columns)?.build()?;
    let spec = EvaluateSpec {
        d: roles.features.len(),
        has_plate: plate.is_some(),
        has_well: well.is_some(),
        seed,
        skip,
        subsample,
    };
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(EvaluateNode::try_new(projected, spec)?),
    }))
}

impl RelationPlanner for CorrectionRelationPlanner {
    fn plan_relation(
        &self,
        relation: TableFactor,
        context: &mut dyn RelationPlannerContext,
    ) -> Result<RelationPlanning> {
        let TableFactor::Table {
            name,
            alias,
            args: Some(args),
            ..
        } = &relation
        else {
            return Ok(RelationPlanning::Original(Box::new(relation)));
        };
        let function = name.to_string().to_ascii_lowercase();
        let method = match function.as_str() {
            "balans" | "correct" | "evaluate" | "preprocess" => Method::Balans,
            _ => return Ok(RelationPlanning::Original(Box::new(relation))),
        };
        let usage =
            format!("{function}((SELECT ...), batch => 'Metadata_Batch'[, name => value ...])");
        let mut arguments = args.args.iter();
        let input = match arguments.next() {
            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(SqlExpr::Subquery(query)))) => context
                .plan(TableFactor::Derived {
                    lateral: false,
                    subquery: query.clone(),
                    alias: None,
                    sample: None,
                })?,
            _ => {
                return plan_err!(
                    "{function}: the first argument must be a subquery in parentheses: {usage}"
                );
            }
        };
        let mut named: Vec<(String, String)> = Vec::new();
        for argument in arguments {
            let (key, value) = match argument {
                FunctionArg::Named {
                    name,
                    arg: FunctionArgExpr::Expr(value),
                    ..
                } => (name.value.clone(), value),
                FunctionArg::ExprNamed {
                    name: SqlExpr::Identifier(name),
                    arg: FunctionArgExpr::Expr(value),
                    ..
                } => (name.value.clone(), value),
                other => {
                    return plan_err!(
                        "{function}: arguments after the subquery are named (k => 10), got '{other}'"
                    );
                }
            };
            named.push((key.to_ascii_lowercase(), literal_text(context, value)?));
        }
        let selection = FeatureSelection {
            include: take_named(&mut named, "features").map_or_else(Vec::new, |f| list(&f)),
            exclude: take_named(&mut named, "exclude").map_or_else(Vec::new, |f| list(&f)),
        };
        let negcon = take_named(&mut named, "negcon");
        if function == "preprocess" {
            let (Some(runner), Some(state)) = (
                &self.preprocess,
                self.session.get().and_then(|state| state()),
            ) else {
                return plan_err!(
                    "preprocess(...) needs a session from balans_engine::session::build_session"
                );
            };
            let (table, description) = runner.run(state, input, named, selection, negcon)?;
            let plan = LogicalPlan::Extension(Extension {
                node: Arc::new(PreprocessNode::try_new(table, description)?),
            });
            return Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
                plan,
                alias.clone(),
            ))));
        }
        if function == "correct"
            && named
                .iter()
                .any(|(k, v)| k == "method" && v.eq_ignore_ascii_case("embed"))
        {
            take_named(&mut named, "method");
            take_named(&mut named, "batch");
            let model = take_named(&mut named, "model").ok_or_else(|| {
                plan_datafusion_err!(
                    "correct: method => 'embed' needs model => 'DIR' (written by balans train)"
                )
            })?;
            if let Some((key, _)) = named.first() {
                return plan_err!(
                    "correct: unknown parameter '{key}' for method => 'embed' (it takes model \
                     and batch; the model names its features)"
                );
            }
            if !selection.include.is_empty() || !selection.exclude.is_empty() || negcon.is_some() {
                return plan_err!(
                    "correct: method => 'embed' takes no features, exclude or negcon (the model \
                     names its features)"
                );
            }
            let plan = crate::embed::embed_plan(input, std::path::Path::new(&model))?;
            return Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
                plan,
                alias.clone(),
            ))));
        }
        let batch = take_named(&mut named, "batch")
            .map(|b| list(&b))
            .ok_or_else(|| {
                plan_datafusion_err!("{function}: batch => 'COLUMN' is required: {usage}")
            })?;
        if function == "evaluate" {
            let plan = plan_evaluate(input, batch, selection, negcon, named, context)?;
            return Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
                plan,
                alias.clone(),
            ))));
        }
        let mut config = BalansConfig {
            method,
            ..BalansConfig::default()
        };
        // The method and the variant bring defaults: apply them before the other values.
        for first in ["method", "variant"] {
            if let Some(value) = take_named(&mut named, first) {
                set_parameter(&mut config, first, &value)
                    .map_err(|e| plan_datafusion_err!("{function}: {e}"))?;
            }
        }
        if function == "balans" && config.method != Method::Balans {
            return plan_err!("{function}: use correct((...), method => '...') for other methods");
        }
        let anchor_label = take_named(&mut named, "anchor_label")
            .or_else(|| take_named(&mut named, "anchor-label"));
        if anchor_label.is_some() && !named.iter().any(|(k, _)| k == "anchor") {
            // A label column alone anchors on it.
            config.anchor = balans_operators::Anchor::Label;
        }
        for (key, value) in &named {
            set_parameter(&mut config, key, value)
                .map_err(|e| plan_datafusion_err!("{function}: {e}"))?;
        }
        config
            .validate()
            .map_err(|e| plan_datafusion_err!("{function}: {e}"))?;
        let schema = input.schema().as_arrow().clone();
        let roles = resolve_columns(&schema, &selection, &batch)
            .map_err(|e| plan_datafusion_err!("{function}: {e}"))?;
        let mut spec = BalansSpec::new(
            roles.features.clone(),
            roles.batch.clone(),
            config.clone(),
            Arc::new(NoProgress),
        );
        match (config.anchor.label(), &anchor_label) {
            (true, Some(label)) => spec.anchor_label = Some(label.clone()),
            (true, None) => {
                return plan_err!(
                    "{function}: anchor => 'label' needs anchor_label => 'COLUMN' (rows whose \
                     value occurs in at least two batches are the anchors)"
                );
            }
            (false, Some(_)) => {
                return plan_err!(
                    "{function}: anchor_label applies with anchor => 'label' or 'both'"
                );
            }
            (false, None) => {}
        }
        let fitted_on_negcon = config.method == Method::Sphering || config.anchor.negcon();
        let input = match (fitted_on_negcon, negcon) {
            (true, Some(predicate)) => {
                let mask = negcon_mask(&function, &predicate, &input, context)?;
                let mut columns: Vec<Expr> = input
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                columns.push(mask.alias(FIT_MASK_COLUMN));
                spec.fit_mask = Some(FIT_MASK_COLUMN.to_string());
                LogicalPlanBuilder::from(input).project(columns)?.build()?
            }
            (true, None) if config.method == Method::Sphering => {
                return plan_err!(
                    "{function}: sphering is fitted on negative controls: add negcon => 'PREDICATE'"
                );
            }
            (true, None) => {
                return plan_err!(
                    "{function}: anchor => 'negcon' estimates the batch offsets from the negative \
                     controls: add negcon => 'PREDICATE'"
                );
            }
            (false, Some(_)) => {
                return plan_err!(
                    "{function}: negcon applies to method => 'sphering' and to anchor => 'negcon' \
                     or 'both'"
                );
            }
            (false, None) => input,
        };
        let plan = balans_plan(input, spec)?;
        Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
            plan,
            alias.clone(),
        ))))
    }
}
