"""Study assembly: series completeness, head-CT series selection, job creation.

See `triage_node.studies.completeness` (`CompletenessTracker`) and
`triage_node.studies.selection` (`select_series`, rules in ``selection_rules.yaml`` read by
`triage_node.studies.selection_rules`).
"""
