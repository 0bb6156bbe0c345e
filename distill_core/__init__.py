"""Code shared by the teacher server and the student trainer."""
