"""What a detector run's report page shows (``graft.report.html.ReportSpec``)."""

from graft.report.html import ReportSpec

REPORT = ReportSpec(
    task_title="object detection",
    headline=(("val_map", "val mAP"), ("val_map50", "val mAP@.5"), ("test_map", "test mAP"), ("test_map50", "test mAP@.5")),
    test_key="test_map",
    forgetting_is_share=False,
    above_backbone="the neck and heads",
    new_part={"branch": "the new classes' detector (a copy of the neck and heads)", "": "the new classes' block"},
    split_boxes=True,
    per_class=(("AP", "ap", "num"), ("AP@.5", "ap50", "num"), ("precision", "precision", "num"), ("recall", "recall", "num"), ("boxes", "boxes", "int")),
    train_column="train boxes",
    score_note=True,
    expansion=(("old_map_before", "old classes' mAP before"), ("old_map_after", "old classes' mAP after"), ("old_map50_before", "old mAP@.5 before"),
               ("old_map50_after", "old mAP@.5 after"), ("new_map", "new classes' mAP"), ("new_map50", "new mAP@.5"), ("new_map_new_images", "new mAP, new images alone"),
               ("overall_map", "overall mAP"), ("forgetting", "forgetting (mAP lost)"), ("old_detections_unchanged", "old detections unchanged")),
    figures=(("ap", "Per-class AP and precision-recall", (("per_class_ap.png", "per-class AP"), ("pr_curves.png", "precision-recall curves"))),
             ("mistakes", "Detections, most mistakes first", (("detections.png", "detections, most mistakes first"),))),
)
