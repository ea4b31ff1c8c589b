from django.db import models


class Role(models.TextChoices):
    STUDENT = "student", "Student"
    TA = "ta", "TA"
    INSTRUCTOR = "instructor", "Instructor"


STAFF_ROLES = (Role.TA, Role.INSTRUCTOR)


class GroupStatus(models.TextChoices):
    PENDING = "pending", "Pending review"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
