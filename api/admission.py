"""Admission: how many images the server holds at once, counted before their work is done.

An image is admitted when its part of the form begins (before its bytes are
read) and let go when its request is answered, so `in_flight` counts every
image being received, decoded, waiting for the model or in it. Beyond
`capacity` a request is refused with 503 at once: before its body is read when
the server is full already, or as soon as the image that does not fit begins.

A refused client is told when to come back (Retry-After): the images ahead of
it times the seconds one image takes in the model, measured on the model
calls themselves (an exponential moving average), so the hint follows the load
and the machine instead of being a constant.
"""

import math
import threading

from .errors import APIError

# Until the first model call is measured: 20 images a second, a small CPU's order of magnitude.
PRIOR_SECONDS_PER_IMAGE = 0.05
MAX_RETRY_AFTER_S = 60
SMOOTHING = 0.2  # weight of the newest model call in the average


class Admission:
    """Images in flight, bounded. reserve/release run on the event loop; `record` on the model worker."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0
        self._seconds_per_image = PRIOR_SECONDS_PER_IMAGE
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self.in_flight >= self.capacity

    def reserve(self, images: int = 1) -> bool:
        if self.in_flight + images > self.capacity:
            return False
        self.in_flight += images
        return True

    def release(self, images: int) -> None:
        self.in_flight -= images

    def record(self, images: int, seconds: float) -> None:
        """A model call captioned `images` in `seconds`."""
        if images <= 0 or seconds <= 0:
            return
        with self._lock:
            self._seconds_per_image += SMOOTHING * (seconds / images - self._seconds_per_image)

    @property
    def seconds_per_image(self) -> float:
        with self._lock:
            return self._seconds_per_image

    def retry_after(self) -> int:
        """Seconds until the images in flight, and one more, have gone through the model."""
        wait = (self.in_flight + 1) * self.seconds_per_image
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait)))

    def overloaded(self) -> APIError:
        return APIError(
            503,
            "overloaded",
            f"{self.in_flight} images are in flight, the most this server holds "
            f"is {self.capacity}; retry after the seconds in Retry-After",
            {"Retry-After": str(self.retry_after())},
        )


class Ticket:
    """One request's admitted images, all let go together when it is answered."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.images = 0

    def admit_image(self) -> None:
        """Admit one more image of this request, or raise 503 overloaded."""
        if not self.admission.reserve(1):
            raise self.admission.overloaded()
        self.images += 1

    def release(self) -> None:
        self.admission.release(self.images)
        self.images = 0
