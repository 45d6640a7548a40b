"""Composer callbacks: the pruning schedule and logs, dynamic domain loading."""
