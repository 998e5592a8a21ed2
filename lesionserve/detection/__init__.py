"""The YOLO11 lesion detector (seed 000's system): boxes, dataset writer, training, serving."""
