"""What a classifier run's report page shows (``graft.report.html.ReportSpec``)."""

from graft.report.html import ReportSpec

REPORT = ReportSpec(
    task_title="image classification",
    headline=(("val_accuracy", "val accuracy"), ("test_accuracy", "test accuracy")),
    test_key="test_accuracy",
    forgetting_is_share=True,
    above_backbone="the head ({head})",
    new_part={"": "the new classes' rows of the last layer"},
    split_boxes=False,
    per_class=(("precision", "precision", "pct"), ("recall", "recall", "pct"), ("F1", "f1", "pct"), ("support", "support", "int")),
    train_column="train images",
    score_note=False,
    expansion=(("old_accuracy_before", "old classes before"), ("old_accuracy_after", "old classes after"), ("new_accuracy", "new classes"),
               ("overall_accuracy", "overall"), ("forgetting", "forgetting (old accuracy lost)"), ("old_taken_by_new", "old images taken by new classes")),
    figures=(("confusion", "Confusion matrix", (("confusion_matrix.png", "confusion matrix"),)),
             ("mistakes", "Predictions, mistakes first", (("predictions.png", "predictions, mistakes first"),))),
)
