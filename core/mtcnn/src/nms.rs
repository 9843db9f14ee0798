//! The three NMS variants facenet-pytorch's MTCNN uses, with the reference's float32 arithmetic
//! and its tie order (the score sorts go through libtorch with the same flags torchvision uses,
//! so equal scores, which saturated probabilities make common, keep the same order).

use tch::{Kind, Tensor};

fn f32s(t: &Tensor) -> Vec<f32> {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().flatten(0, -1);
    // A contiguous CPU f32 tensor always converts.
    Vec::<f32>::try_from(&t).expect("f32 tensor")
}

fn i64s(t: &Tensor) -> Vec<i64> {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Int64).contiguous().flatten(0, -1);
    Vec::<i64>::try_from(&t).expect("i64 tensor")
}

/// torchvision's CPU `nms` kernel: order by score (stable, descending), greedy suppression of
/// IoU > `thr`; areas without the +1 of the Caffe convention; IoU in f32 compared in f64.
fn nms(boxes: &[[f32; 4]], scores: &Tensor, thr: f64) -> Vec<usize> {
    let order = i64s(&scores.sort_stable(true, 0, true).1);
    let area: Vec<f32> = boxes.iter().map(|b| (b[2] - b[0]) * (b[3] - b[1])).collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        let i = i as usize;
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = boxes[i];
        for &j in &order[oi + 1..] {
            let j = j as usize;
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let ovr = inter / (area[i] + area[j] - inter);
            if ovr as f64 > thr {
                suppressed[j] = true;
            }
        }
    }
    keep
}

fn rows4(t: &Tensor) -> Vec<[f32; 4]> {
    f32s(t).chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

/// Boxes of different images are moved apart by `image · (max coordinate + 1)`, in f32, as
/// both torchvision's coordinate trick and facenet-pytorch's numpy variant do (this rounding is
/// part of the reference's numerics for every image after the first of a batch).
fn offset_boxes(boxes: &Tensor, idxs: &Tensor) -> Tensor {
    let max = boxes.max();
    let offsets = idxs.to_kind(Kind::Float) * (max + 1.0);
    boxes + offsets.unsqueeze(1)
}

/// torchvision's `batched_nms(boxes [K, 4], scores [K], idxs [K], thr)`: indices kept, by
/// decreasing score. Like torchvision on the CPU, more than 1000 boxes take the per-class loop
/// ("vanilla"), fewer the coordinate trick: the two differ in rounding and in tie order.
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, thr: f64) -> Tensor {
    let k = boxes.size()[0];
    if k == 0 {
        return Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu));
    }
    let boxes = boxes.to_device(tch::Device::Cpu).to_kind(Kind::Float);
    let scores = scores.to_device(tch::Device::Cpu).to_kind(Kind::Float);
    let idxs = idxs.to_device(tch::Device::Cpu).to_kind(Kind::Int64);
    if boxes.numel() > 4000 {
        let ids = i64s(&idxs);
        let mut classes = ids.clone();
        classes.sort_unstable();
        classes.dedup();
        let mut keep_mask = vec![false; k as usize];
        for c in classes {
            let cur: Vec<i64> = (0..k).filter(|&i| ids[i as usize] == c).collect();
            let sel = Tensor::from_slice(&cur);
            let kept = nms(&rows4(&boxes.index_select(0, &sel)), &scores.index_select(0, &sel), thr);
            for j in kept {
                keep_mask[cur[j] as usize] = true;
            }
        }
        let keep: Vec<i64> = (0..k).filter(|&i| keep_mask[i as usize]).collect();
        let keep = Tensor::from_slice(&keep);
        // `scores[keep].sort(descending=True)`: the default (unstable) sort, as torchvision calls it.
        let order = scores.index_select(0, &keep).sort(-1, true).1;
        keep.index_select(0, &order)
    } else {
        let b = offset_boxes(&boxes, &idxs);
        let kept: Vec<i64> = nms(&rows4(&b), &scores, thr).into_iter().map(|i| i as i64).collect();
        Tensor::from_slice(&kept)
    }
}

/// facenet-pytorch's `batched_nms_numpy(..., 'Min')`: overlap = intersection / smaller area
/// with the Caffe +1 convention, suppression where overlap > `thr`. numpy 2 compares a float32
/// array with a Python float in float32 (NEP 50), hence `thr as f32`.
///
/// The reference orders by `np.argsort` (an unstable sort); equal scores are taken here in
/// descending index order (a stable ascending sort read from the end). Only exact f32 ties
/// between two overlapping O-Net boxes can tell the two apart.
pub fn batched_nms_min(boxes: &Tensor, scores: &Tensor, idxs: &Tensor, thr: f64) -> Tensor {
    let k = boxes.size()[0];
    if k == 0 {
        return Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu));
    }
    let boxes = boxes.to_device(tch::Device::Cpu).to_kind(Kind::Float);
    let b = rows4(&offset_boxes(&boxes, &idxs.to_device(tch::Device::Cpu)));
    let s = f32s(scores);
    let area: Vec<f32> = b.iter().map(|b| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)).collect();
    let mut order: Vec<usize> = (0..b.len()).collect();
    order.sort_by(|&x, &y| s[x].total_cmp(&s[y]));
    let thr = thr as f32;
    let mut pick = Vec::new();
    while let Some(i) = order.pop() {
        pick.push(i as i64);
        let bi = b[i];
        order.retain(|&j| {
            let bj = b[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0]) + 1.0).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1]) + 1.0).max(0.0);
            let o = (w * h) / area[i].min(area[j]);
            o <= thr
        });
    }
    Tensor::from_slice(&pick)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(b: &[[f32; 4]]) -> Tensor {
        Tensor::from_slice(&b.concat()).reshape([b.len() as i64, 4])
    }

    #[test]
    fn nms_suppresses_overlaps_by_score() {
        // Box 1 lies inside box 0 with IoU 64/100 = 0.64 (> 0.5, < 0.7), box 2 is disjoint.
        let boxes = t(&[[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]);
        let scores = Tensor::from_slice(&[0.8f32, 0.9, 0.7]);
        let idx = Tensor::from_slice(&[0i64, 0, 0]);
        assert_eq!(i64s(&batched_nms(&boxes, &scores, &idx, 0.5)), vec![1, 2]);
        // At IoU threshold 0.7 nothing is suppressed.
        assert_eq!(i64s(&batched_nms(&boxes, &scores, &idx, 0.7)), vec![1, 0, 2]);
        // Different images never suppress each other.
        let idx = Tensor::from_slice(&[0i64, 1, 0]);
        assert_eq!(i64s(&batched_nms(&boxes, &scores, &idx, 0.5)), vec![1, 0, 2]);
    }

    #[test]
    fn min_nms_uses_the_smaller_area() {
        // A small box inside a big one: IoU is small but intersection / min area = 1.
        let boxes = t(&[[0.0, 0.0, 99.0, 99.0], [10.0, 10.0, 19.0, 19.0]]);
        let scores = Tensor::from_slice(&[0.9f32, 0.95]);
        let idx = Tensor::from_slice(&[0i64, 0]);
        assert_eq!(i64s(&batched_nms_min(&boxes, &scores, &idx, 0.7)), vec![1]);
        assert_eq!(i64s(&batched_nms(&boxes, &scores, &idx, 0.7)), vec![1, 0]);
    }
}
