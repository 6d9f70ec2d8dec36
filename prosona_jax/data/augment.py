"""Per-example geometric augmentation: random flips and a random rotation.

The image and every rater mask get the *same* transform, so they stay aligned:
flips first, then a rotation about the image centre by an angle uniform in [-180, 180]
degrees. The image is interpolated bilinearly; the masks are interpolated bilinearly as
floats and thresholded at 0.5, which keeps them binary with smoother edges than
nearest-neighbour. Pixels rotated in from outside the frame are filled with 0 (image
background and "no lesion").

Every call draws the same three random numbers whatever the switches, so turning rotation
off leaves the flips of a given seed unchanged.
"""

from typing import Any

import grain
import numpy as np
from scipy import ndimage


def transform_example(image: np.ndarray, masks: np.ndarray, *, flip_h: bool = False,
                      flip_v: bool = False,
                      angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Applies one fixed transform to an image and its masks.

  Args:
    image: float (H, W, C).
    masks: {0, 1} (R, H, W).
    flip_h: Mirror left-right (the W axis).
    flip_v: Mirror top-bottom (the H axis).
    angle: Rotation in degrees, counter-clockwise as displayed with row 0 on top
      (scipy's convention for the (H, W) plane); 0 skips interpolation entirely.

  Returns:
    The image as float32 (H, W, C) and the masks as uint8 (R, H, W).
  """
  image = np.asarray(image, dtype=np.float32)
  masks = np.asarray(masks)
  if flip_h:
    image, masks = image[:, ::-1, :], masks[:, :, ::-1]
  if flip_v:
    image, masks = image[::-1, :, :], masks[:, ::-1, :]
  if angle != 0.0:
    # Both calls rotate in the (H, W) plane in the same direction: axes are ordered
    # (H, W) for the image and (H, W) for the masks, only their positions differ.
    image = ndimage.rotate(image, angle, axes=(0, 1), reshape=False, order=1,
                           mode="constant", cval=0.0)
    soft = ndimage.rotate(masks.astype(np.float32), angle, axes=(1, 2), reshape=False,
                          order=1, mode="constant", cval=0.0)
    masks = soft >= 0.5
  return (np.ascontiguousarray(image, dtype=np.float32),
          np.ascontiguousarray(masks, dtype=np.uint8))


def random_transform_params(rng: np.random.Generator) -> tuple[bool, bool, float]:
  """Draws (flip_h, flip_v, angle in degrees) from `rng`, always three draws."""
  flip_h, flip_v = (bool(b) for b in rng.random(2) < 0.5)
  angle = float(rng.uniform(-180.0, 180.0))
  return flip_h, flip_v, angle


def augment_example(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *,
                    flip: bool = True,
                    rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Randomly flips and rotates an image and its masks together.

  Args:
    image: float (H, W, C).
    masks: {0, 1} (R, H, W).
    rng: Source of randomness (Grain hands a per-element, per-epoch generator).
    flip: Enable the random horizontal and vertical flips (each with probability 1/2).
    rotate: Enable the random rotation by an angle uniform in [-180, 180] degrees.

  Returns:
    The image as float32 (H, W, C) and the masks as uint8 (R, H, W) in {0, 1}.
  """
  flip_h, flip_v, angle = random_transform_params(rng)
  return transform_example(image, masks, flip_h=flip and flip_h, flip_v=flip and flip_v,
                           angle=angle if rotate else 0.0)


class Augment(grain.transforms.RandomMap):
  """Grain random map that augments `image` and `masks` and passes other fields through.

  Attributes:
    flip: Random horizontal and vertical flips.
    rotate: Random rotation in [-180, 180] degrees.
  """

  def __init__(self, *, flip: bool = True, rotate: bool = True):
    self.flip = flip
    self.rotate = rotate

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Returns a new record with the augmented image and masks."""
    image, masks = augment_example(element["image"], element["masks"], rng,
                                   flip=self.flip, rotate=self.rotate)
    return {**element, "image": image, "masks": masks}
